"""Save and load a trained model with everything needed to rebuild it.

A checkpoint carries its ``model_version`` (backbone, method and a digest of
the weights): the cloud stamps it on every reply and the device checks that
the weights it receives fit the static layers it holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from duet_bus.data.prep import Prepared, PrepConfig
from duet_bus.data.sessions import SessionConfig
from duet_bus.errors import CheckpointError
from duet_bus.models import LayerWeights, ModelConfig, PPGConfig, RecModel, build_model
from duet_bus.protocol import ModelSpec
from duet_bus.train import TrainConfig, tensors, train_model

FORMAT = "duet-bus-checkpoint/1"


@dataclass
class Checkpoint:
    model: RecModel
    model_version: str
    dataset: str
    prep: PrepConfig
    n_items: int
    global_layers: LayerWeights  # the fallback classifier when generated weights do not arrive

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.model_version, self.n_items, self.prep.history_len,
                         tuple(self.model.backbone.dynamic_shapes))


@torch.inference_mode()
def global_layers(model: RecModel, prepared: Prepared) -> LayerWeights:
    """The global classifier of a model.

    For the base model it is its classifier. For DUET it is the mean of the
    weights generated for every device's validation session: what the cloud
    would send a device it knows nothing about.
    """
    if not model.generative:
        return [(w.detach().clone(), b.detach().clone()) for w, b in model.head.layer_weights()]
    model.eval()
    x = tensors(prepared.eval_samples("valid"))
    weights = model.weights_for(x["realtime"], x["realtime_len"])
    return [(w.mean(0), b.mean(0)) for w, b in weights]


def model_version(model: RecModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return f"{model.config.backbone}-{model.config.method}-{digest.hexdigest()[:10]}"


def save(path: str | Path, model: RecModel, prepared: Prepared) -> str:
    """Write the checkpoint; return its model version."""
    version = model_version(model)
    config = asdict(model.config)
    torch.save(
        {
            "format": FORMAT,
            "model_version": version,
            "dataset": prepared.name,
            "model_config": config,
            "prep_config": asdict(prepared.config),
            "n_items": prepared.n_items,
            "state_dict": model.state_dict(),
            "global_layers": [[w, b] for w, b in global_layers(model, prepared)],
        },
        Path(path),
    )
    return version


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; make one with `duet train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a duet-bus checkpoint (format {FORMAT} expected)")
    cfg = dict(blob["model_config"])
    cfg["ppg"] = PPGConfig(**cfg["ppg"]) if cfg["ppg"] else None
    model_config = ModelConfig(**cfg)
    prep_cfg = dict(blob["prep_config"])
    prep_cfg["sessions"] = SessionConfig(**prep_cfg["sessions"])
    prep = PrepConfig(**prep_cfg)
    model = build_model(model_config, blob["n_items"], prep.history_len)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model they describe: {exc}") from exc
    model.eval()
    version = model_version(model)
    if version != blob["model_version"]:
        raise CheckpointError(f"{path}: weights digest {version} differs from the recorded {blob['model_version']}")
    layers = [(w, b) for w, b in blob["global_layers"]]
    return Checkpoint(model, version, blob["dataset"], prep, blob["n_items"], layers)


def cached(cache_dir: str | Path, prepared: Prepared, config: ModelConfig, train: TrainConfig, seed: int,
           progress=None) -> Checkpoint:
    """The checkpoint of this recipe (data, model, training, seed): trained once, then loaded from the cache."""
    recipe = json.dumps({"dataset": prepared.name, "n_items": prepared.n_items, "users": prepared.n_users,
                         "interactions": len(prepared.items), "prep": asdict(prepared.config),
                         "model": asdict(config), "train": asdict(train), "seed": seed, "format": FORMAT},
                        sort_keys=True)
    path = Path(cache_dir) / f"{config.backbone}-{config.method}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        result = train_model(prepared, config, train, seed, progress=progress, label=config.method)
        save(path.with_suffix(".tmp"), result.model, prepared)
        path.with_suffix(".tmp").replace(path)
    return load(path)

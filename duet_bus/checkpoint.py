"""Save and load a trained model with everything needed to rebuild it.

A checkpoint carries its ``model_version`` (backbone, method and a digest of
the weights): the cloud stamps it on every reply and the device checks that
the weights it receives fit the static layers it holds. It also says which
task it belongs to; the task (`duet_bus.tasks`) rebuilds its model, its data
preparation and the `ModelSpec` both sides check messages against.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duet_bus.errors import CheckpointError, DuetError
from duet_bus.models import LayerWeights
from duet_bus.models.dynamic import Factored
from duet_bus.protocol import ModelSpec
from duet_bus.tasks import task_named

FORMAT = "duet-bus-checkpoint/2"
FORMATS = (FORMAT, "duet-bus-checkpoint/1")  # /1: recommendation only, no task field


@dataclass
class Checkpoint:
    model: nn.Module  # RecModel or VisionModel
    model_version: str
    dataset: str
    prep: Any  # the task's data preparation (PrepConfig, ImagePrepConfig)
    n_items: int  # 0 for tasks without items
    global_layers: LayerWeights  # the fallback classifier when generated weights do not arrive
    task: str = "recommendation"

    @functools.cached_property
    def spec(self) -> ModelSpec:
        # Cached: the cloud checks every request against it (computing it cost 7 us a request).
        return task_named(self.task).spec(self)


@torch.inference_mode()
def global_layers(model, prepared) -> LayerWeights:
    """The global classifier of a model.

    For the base model it is its classifier. For DUET it is the mean of the
    weights generated for every device's validation session: what the cloud
    would send a device it knows nothing about.
    """
    if not model.generative:
        return [(w.detach().clone(), b.detach().clone()) for w, b in model.head.layer_weights()]
    model.eval()
    # W is linear in H, so the mean head is made from the mean factor: every validation session's
    # full head (hundreds of MB for a MobileNetV3 head) is never formed.
    weights = task_named(model.config.task).validation_weights(model, prepared)
    return [tuple(t.squeeze(0) for t in Factored(f.h.mean(0, keepdim=True), f.w2, f.b2,
                                                  f.b.mean(0, keepdim=True)).materialize()) for f in weights]


def model_version(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return f"{model.config.name}-{model.config.method}-{digest.hexdigest()[:10]}"


def save(path: str | Path, model, prepared) -> str:
    """Write the checkpoint; return its model version."""
    version = model_version(model)
    config = asdict(model.config)
    torch.save(
        {
            "format": FORMAT,
            "task": model.config.task,
            "model_version": version,
            "dataset": prepared.name,
            "model_config": config,
            "prep_config": asdict(prepared.config),
            "n_items": getattr(prepared, "n_items", 0),
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
    except pickle.UnpicklingError as exc:  # torch's message suggests weights_only=False: running the file's code
        raise CheckpointError(f"{path}: not a duet-bus checkpoint (not a file of weights torch can read; "
                              f"checkpoints are what `duet train` writes)") from exc
    except Exception as exc:  # torch raises many types for a corrupt file, each with paragraphs of advice
        reason = str(exc).strip().split("\n")[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint, cut short or corrupt? "
                              f"({exc.__class__.__name__}: {reason})") from exc
    if not isinstance(blob, dict) or blob.get("format") not in FORMATS:
        raise CheckpointError(f"{path}: not a duet-bus checkpoint (format {FORMAT} expected)")
    try:
        task = task_named(blob.get("task", "recommendation"))
        prep = task.prep_from_dict(blob["prep_config"])
        model = task.model_from_dict(blob["model_config"], prep, blob["n_items"])
    except (KeyError, TypeError, ValueError, AttributeError, DuetError) as exc:
        raise CheckpointError(f"{path}: the task, data or model it records cannot be rebuilt "
                              f"({exc.__class__.__name__}: {exc})") from exc
    try:
        model.load_state_dict(blob["state_dict"])
        layers = [(w, b) for w, b in blob["global_layers"]]
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model they describe: {exc}") from exc
    model.eval()
    version = model_version(model)
    if version != blob["model_version"]:
        raise CheckpointError(f"{path}: weights digest {version} differs from the recorded {blob['model_version']}")
    return Checkpoint(model, version, blob["dataset"], prep, blob["n_items"], layers, task.name)


def cached(cache_dir: str | Path, config, prepared, method: str, seed: int, progress=None) -> Checkpoint:
    """The checkpoint of a method's recipe (data, model, training, seed; ``config`` an `EvalConfig`):
    trained by its task once, then loaded from the cache."""
    task = config.task
    # Only what shapes the trained model enters the key: not the methods list, the seeds or fine-tuning.
    recipe = json.dumps({"dataset": prepared.name, "data": task.fingerprint(prepared), "prep": asdict(prepared.config),
                         "backbone": config.backbone, "swa": asdict(config.swa), "dropout": config.dropout,
                         "width": config.width, "small_input": config.small_input, "train": asdict(config.train),
                         "method": method, "seed": seed, "format": FORMAT, "training": task.training_version},
                        sort_keys=True)
    path = Path(cache_dir) / f"{config.backbone}-{method}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _training_lock(path):  # processes wanting the same recipe at once (a run's shards, two runs): one trains
            if not path.is_file():  # the others find it trained when they get the lock
                model, _, _ = task.train(config, prepared, method, seed, progress)
                # A temporary file of this process's own, renamed into place whole: also where the lock is
                # not to be had (no `fcntl`), each process writes its own and the last rename wins.
                part = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
                save(part, model, prepared)
                part.replace(path)
    return load(path)


@contextlib.contextmanager
def _training_lock(path: Path):
    """Hold an exclusive lock on ``path``'s lock file (``.lock`` beside it) while training it; removed after.

    A process that opened the file before it was removed may then lock a file no longer in the folder, and
    train beside a later one: at worst the same recipe trained twice, each renamed into place whole."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the temporary files keep it safe
        yield
        return
    lock = path.with_suffix(".lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

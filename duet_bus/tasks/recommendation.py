"""Sequential recommendation on MovieLens (the paper's Table 1).

Per seed: prepare the data (the seed fixes the evaluation negatives), train
the base model and the DUET models the methods need, and score every user's
test session (1 positive, 100 negatives) with

- ``base``: the global model, no device model generalisation;
- ``finetune``: per device, the base model's classifier (the dynamic layers)
  takes ``k`` Adam steps on the device's labelled recent samples, then
  predicts; the wall time of those steps on this CPU is measured per device;
- ``duet_no_swa`` / ``duet`` / ``duet_npK``: the generator makes the
  classifier's weights from the device's real-time clicks in one forward pass.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from duet_bus.data import load_dataset, prepare
from duet_bus.data.prep import Prepared, PrepConfig
from duet_bus.finetune import FinetuneConfig, finetune_classifier
from duet_bus.data.streams import DeviceStream, offline_test_sessions
from duet_bus.errors import ConfigError
from duet_bus.metrics import auc, ranking_metrics, session_ranking_metrics
from duet_bus.models import BACKBONES, ModelConfig, PPGConfig, RecModel, build_model
from duet_bus.protocol import ModelSpec
from duet_bus.tasks.base import Task, generators, register_task
from duet_bus.data.sessions import SessionConfig
from duet_bus.train import TrainConfig, predict, tensors, train_model


def model_config(config, method: str) -> ModelConfig:
    """The model a method trains (``finetune`` uses the base model)."""
    n_p = generators(method, config.swa.n_generators)
    ppg = None if n_p is None else replace(config.swa, n_generators=n_p)
    return ModelConfig(backbone=config.backbone, dropout=config.dropout, ppg=ppg)


def finetune_scores(
    model: RecModel, prepared: Prepared, config: FinetuneConfig, seed: int, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune the classifier per device (`finetune.finetune_classifier`), then score its session.

    Returns the ``(n_users, K)`` logits and each device's fine-tuning wall time in ms.
    """
    rng = np.random.default_rng(seed + 2)
    sessions = prepared.eval_samples(split)
    start = model.head.layer_weights()
    model.eval()
    scores = np.empty(sessions.targets.shape, np.float32)
    millis = np.empty(prepared.n_users)
    for u in range(prepared.n_users):
        recent = prepared.recent_labelled(rng, u, split, config.recent)
        weights, millis[u] = finetune_classifier(model, start, recent, config)
        x = tensors(sessions.take(np.array([u])))
        with torch.inference_mode():
            scores[u] = model.score(x["history"], x["history_len"], x["targets"], weights).numpy()[0]
    return scores, millis


def generation_millis(model: RecModel, prepared: Prepared, count: int = 200) -> np.ndarray:
    """Wall time of generating one session's weights (batch of 1), in ms."""
    sessions = prepared.eval_samples("test")
    x = tensors(sessions)
    out = np.empty(min(count, len(sessions)))
    model.eval()
    with torch.inference_mode():
        model.weights_for(x["realtime"][:1], x["realtime_len"][:1])  # warm-up
        for i in range(len(out)):
            start = time.perf_counter()
            model.weights_for(x["realtime"][i : i + 1], x["realtime_len"][i : i + 1])
            out[i] = (time.perf_counter() - start) * 1000
    return out


def device_cost(model: RecModel, prepared: Prepared) -> dict[str, int]:
    """Parameters the device holds (static layers + one set of dynamic weights) and FLOPs per sample."""
    shapes = model.backbone.dynamic_shapes
    params = sum(p.numel() for p in model.backbone.parameters()) + sum(i * o + o for i, o in shapes)
    x = tensors(prepared.eval_samples("test", users=np.array([0])))
    weights = [(torch.zeros(i, o), torch.zeros(o)) for i, o in shapes]
    model.eval()
    counter = FlopCounterMode(display=False)
    # With autograd on: under no_grad/inference_mode the transformer layer runs
    # a fused fast-path kernel that the counter does not see.
    with counter:
        model.score(x["history"], x["history_len"], x["targets"][:, :1], weights)
    return {"params": int(params), "flops_per_sample": int(counter.get_total_flops())}


@register_task
class Recommendation(Task):
    name = "recommendation"
    datasets = ("ml-100k", "ml-1m", "csv")
    backbone_note = " (a backbone of your own: register it in a module given with --plugin)"
    default_backbone = "sasrec"
    metrics = ("auc", "gauc", "ndcg10", "hr10", "logloss")
    primary = "auc"
    higher_is_better = {"auc": True, "gauc": True, "ndcg10": True, "hr10": True, "logloss": False}

    @property
    def backbones(self) -> tuple[str, ...]:  # the built-in ones and those plugins registered (`register_backbone`)
        return tuple(BACKBONES)

    def default_prep(self) -> PrepConfig:
        return PrepConfig()

    def prep_from_args(self, args) -> PrepConfig:
        return PrepConfig(history_len=args.history_len, eval_negatives=args.eval_negatives,
                          sessions=SessionConfig(length=args.session_length or SessionConfig().length),
                          holdout=args.holdout or 0.0)

    def default_train(self) -> TrainConfig:
        return TrainConfig()

    def source(self, config) -> str:
        return load_dataset(config.dataset, config.data_path).source

    def prepare(self, config, seed: int) -> Prepared:
        return prepare(load_dataset(config.dataset, config.data_path), config.prep, seed=seed)

    def train(self, config, prepared: Prepared, method: str, seed: int, progress):
        result = train_model(prepared, model_config(config, method), config.train, seed, progress,
                             label=f"seed {seed} {method}")
        summary = {"best_epoch": result.best_epoch, "valid_auc": result.best_valid_auc,
                   "seconds_per_epoch": result.seconds_per_epoch}
        return result.model, summary, [{"epoch": e.epoch, "loss": e.loss, "valid_auc": e.valid_auc,
                                        "seconds": e.seconds} for e in result.log]

    def score(self, config, model: RecModel, prepared: Prepared, seed: int, method: str):
        metrics = ranking_metrics(predict(model, prepared.eval_samples("test")))
        return metrics, generation_millis(model, prepared).tolist() if model.generative else []

    def finetune(self, config, model: RecModel, prepared: Prepared, seed: int, method: str):
        scores, millis = finetune_scores(model, prepared, config.finetune, seed)
        return ranking_metrics(scores), millis.tolist()

    def device_cost(self, model: RecModel, prepared: Prepared) -> dict[str, int]:
        return device_cost(model, prepared)

    def prep_from_dict(self, doc: dict) -> PrepConfig:
        return PrepConfig(**{**doc, "sessions": SessionConfig(**doc["sessions"])})

    def model_from_dict(self, doc: dict, prep: PrepConfig, n_items: int) -> RecModel:
        config = ModelConfig(**{**doc, "ppg": PPGConfig(**doc["ppg"]) if doc["ppg"] else None})
        return build_model(config, n_items, prep.history_len)

    def validation_weights(self, model: RecModel, prepared: Prepared) -> list:
        x = tensors(prepared.eval_samples("valid"))
        return model.weights_for(x["realtime"], x["realtime_len"], factored=True)

    def spec(self, checkpoint) -> ModelSpec:
        model = checkpoint.model
        return ModelSpec(checkpoint.model_version, checkpoint.n_items, checkpoint.prep.history_len,
                         tuple(model.backbone.dynamic_shapes), (("items", ()),),
                         model.config.ppg.hidden_dim if model.generative else 0)

    def test_sessions(self, checkpoint, data_path: str | None, seed: int, count: int) -> list:
        prepared = prepare(load_dataset(checkpoint.dataset, data_path), checkpoint.prep, seed=seed)
        if not 1 <= count <= prepared.n_users:
            raise ConfigError(f"--count: must be in 1..{prepared.n_users}, got {count}")
        return offline_test_sessions(prepared, np.arange(count))

    def pooled_metrics(self, scores: list, labels: list) -> dict[str, float]:
        return {"auc": auc(np.concatenate(labels), np.concatenate(scores))}

    # -- the scenario runner ---------------------------------------------------------------------

    scenario_data = {
        "history_len": ("int", 10, {"min": 1}),
        "session_length": ("int", 5, {"min": 1}),
        "holdout": ("float", 0.3, {"gt": 0, "lt": 1}),
        "eval_negatives": ("int", 100, {"min": 1}),
    }
    scenario_model = {"backbone": "gru4rec", "epochs": 10, "batch_size": 256, "lr": 1e-3}
    training_version = 3  # 2: batches of whole sessions, fused Adam (`train.session_batches`); 3: a session's
    # summary read off its first sample's features (`RecModel.forward`: one dropout mask for both)
    session_metrics_names = ("auc", "ndcg10", "hr10", "logloss")
    timestamps = True

    def prep_from_scenario(self, values: dict) -> PrepConfig:
        return PrepConfig(history_len=values["history_len"], eval_negatives=values["eval_negatives"],
                          sessions=SessionConfig(length=values["session_length"]), holdout=values["holdout"])

    def fingerprint(self, prepared: Prepared) -> dict:
        return {"n_items": prepared.n_items, "users": prepared.n_users, "interactions": len(prepared.items)}

    def stream_owners(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        return prepared.raw_user_ids, np.flatnonzero(prepared.lengths() > prepared.known)

    def device_stream(self, index: int, prepared: Prepared, owner: int) -> DeviceStream:
        return DeviceStream(index, prepared, owner, prepared.config.eval_negatives)

    def session_metrics(self, scores: np.ndarray, session) -> dict[str, float]:
        return self.session_metrics_many([scores], [session])[0]

    def session_metrics_many(self, scores: list, sessions: list) -> list[dict[str, float]]:
        if not scores:
            return []
        metrics = session_ranking_metrics([s.reshape(-1, session.samples.targets.shape[1])
                                           for s, session in zip(scores, sessions)])
        columns = [metrics[name].tolist() for name in self.session_metrics_names]
        return [dict(zip(self.session_metrics_names, row)) for row in zip(*columns)]

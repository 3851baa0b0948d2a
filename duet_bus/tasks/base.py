"""The `Task` interface and the registry that maps a dataset to its task."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from duet_bus.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from rich.progress import Progress

    from duet_bus.train import TrainConfig

    from duet_bus.evaluate import EvalConfig
    from duet_bus.protocol import ModelSpec

# base, finetune, duet_no_swa (N_p = 1), duet (N_p from the config), duet_npK (N_p = K: the SWA sweep)
METHOD = re.compile(r"^(base|finetune|duet_no_swa|duet|duet_np([1-9][0-9]?))$")


def generators(method: str, default: int) -> int | None:
    """``N_p`` of a generative method (``duet_np3`` -> 3, ``duet`` -> ``default``); None otherwise."""
    match = METHOD.match(method)
    if match is None or method in ("base", "finetune"):
        return None
    if method == "duet":
        return default
    return 1 if method == "duet_no_swa" else int(match.group(2))


@dataclass
class SeedResult:
    """What one seed of `duet evaluate` measured, per method."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    delays_ms: dict[str, list[float]] = field(default_factory=dict)  # per session: generation or fine-tuning
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # best epoch, its validation score, speed
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # per epoch, for the figures
    device: dict[str, int] = field(default_factory=dict)  # what the device holds and computes


class Task:
    """One task's parts. Subclasses set the class attributes and implement `run_seed`."""

    name: ClassVar[str]
    datasets: ClassVar[tuple[str, ...]]
    backbones: ClassVar[tuple[str, ...]]
    backbone_note: ClassVar[str] = ""  # said after the list of backbones when one is not among them
    default_backbone: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what every method reports, as <metric>_mean / <metric>_std
    primary: ClassVar[str]  # the metric tables lead with and training selects on
    higher_is_better: ClassVar[dict[str, bool]]

    def default_prep(self) -> Any:
        """The data preparation `duet evaluate` uses when none is given."""
        raise NotImplementedError

    def prep_from_args(self, args: "argparse.Namespace") -> Any:
        """The data preparation from `duet evaluate` / `duet train` arguments (None: the default)."""
        raise NotImplementedError

    def default_train(self) -> "TrainConfig":
        """The training schedule when the command line gives none."""
        raise NotImplementedError

    def check(self, config: "EvalConfig") -> None:
        """Raise `ConfigError` for what this task cannot run."""
        if config.backbone not in self.backbones:
            raise ConfigError(f"backbone: {config.backbone!r} is not a backbone of the {self.name} task; choose one of "
                              f"{', '.join(self.backbones)}{self.backbone_note}")

    def run_seed(self, config: "EvalConfig", seed: int, progress: "Progress") -> SeedResult:
        """Prepare the data, train what the methods need (``finetune`` starts from base) and score
        every test session with each method."""
        prepared = self.prepare(config, seed)
        out = SeedResult()
        trained: dict[str, Any] = {}
        wanted = {"base" if m == "finetune" else m for m in config.methods}
        for method in dict.fromkeys(m for m in ("base", *config.methods) if m in wanted):
            trained[method], out.training[method], out.curves[method] = self.train(
                config, prepared, method, seed, progress)
        out.device = self.device_cost(next(iter(trained.values())), prepared)
        for method in config.methods:
            model = trained["base" if method == "finetune" else method]
            score = self.finetune if method == "finetune" else self.score
            out.metrics[method], out.delays_ms[method] = score(config, model, prepared, seed, method)
        return out

    # -- the parts run_seed asks for --------------------------------------------------------------

    def prepare(self, config: "EvalConfig", seed: int) -> Any:
        """The seed's data, ready for training and evaluation."""
        raise NotImplementedError

    def train(self, config: "EvalConfig", prepared: Any, method: str, seed: int, progress: "Progress"
              ) -> tuple[Any, dict[str, Any], list[dict[str, float]]]:
        """A trained model of ``method``, its training summary and its per-epoch log."""
        raise NotImplementedError

    def score(self, config: "EvalConfig", model: Any, prepared: Any, seed: int, method: str
              ) -> tuple[dict[str, float], list[float]]:
        """The metrics of the test sessions and, for generated weights, the generation times (ms)."""
        raise NotImplementedError

    def finetune(self, config: "EvalConfig", model: Any, prepared: Any, seed: int, method: str
                 ) -> tuple[dict[str, float], list[float]]:
        """Metrics after fine-tuning the base head per device, and the fine-tuning times (ms)."""
        raise NotImplementedError

    def device_cost(self, model: Any, prepared: Any) -> dict[str, int]:
        """Parameters the device holds and FLOPs per sample (Tables 1 and 2)."""
        raise NotImplementedError

    # -- checkpoints and the bus -----------------------------------------------------------------

    def prep_from_dict(self, doc: dict) -> Any:
        """The data preparation a checkpoint recorded."""
        raise NotImplementedError

    def model_from_dict(self, doc: dict, prep: Any, n_items: int) -> Any:
        """An untrained model of the configuration a checkpoint recorded."""
        raise NotImplementedError

    def validation_weights(self, model: Any, prepared: Any) -> list:
        """The weights generated for every validation session, factored (their mean is the fallback head)."""
        raise NotImplementedError

    def spec(self, checkpoint: Any) -> "ModelSpec":
        """What the checkpoint's model accepts and produces on the wire."""
        raise NotImplementedError

    def test_sessions(self, checkpoint: Any, data_path: str | None, seed: int, count: int) -> list:
        """``count`` offline test sessions (`DeviceSession`) of the checkpoint's data, one per device."""
        raise NotImplementedError

    def pooled_metrics(self, scores: list, labels: list) -> dict[str, float]:
        """The task's metrics over many sessions' reported scores and labels together."""
        raise NotImplementedError

    def source(self, config: "EvalConfig") -> str:
        """Where the data came from, for the results document."""
        raise NotImplementedError

    # -- the scenario runner (`duet run`) --------------------------------------------------------

    # What a scenario's ``data`` section may set for this task, beyond dataset and path:
    # key -> (kind, default, limits) as `duet_bus.scenario` reads them.
    scenario_data: ClassVar[dict[str, tuple[str, Any, dict]]] = {}
    # Defaults of a scenario's ``model`` section: backbone, epochs, batch_size, lr.
    scenario_model: ClassVar[dict[str, Any]] = {}
    model_options: ClassVar[tuple[str, ...]] = ()  # further ``model`` keys this task's backbones take
    # Bumped when the task trains differently from the same recipe: cached checkpoints are not reused.
    training_version: ClassVar[int] = 1
    session_metrics_names: ClassVar[tuple[str, ...]]  # the columns of one session's row
    timestamps: ClassVar[bool] = False  # held-out sessions carry dataset times (``arrivals: replay``)

    def prep_from_scenario(self, values: dict[str, Any]) -> Any:
        """The data preparation from a scenario's ``data`` values (`ConfigError` names a bad one)."""
        raise NotImplementedError

    def fingerprint(self, prepared: Any) -> dict[str, Any]:
        """What tells this prepared data from other data with the same preparation (checkpoint cache key)."""
        raise NotImplementedError

    def stream_owners(self, prepared: Any) -> tuple[Any, Any]:
        """Raw ids of the data's owners (users, camera devices) by index, and the indices of the owners
        with held-out sessions to stream."""
        raise NotImplementedError

    def device_stream(self, index: int, prepared: Any, owner: int) -> Any:
        """Simulated device ``index`` starting with ``owner``'s held-out sessions (`data.streams`)."""
        raise NotImplementedError

    def session_metrics(self, scores: Any, session: Any) -> dict[str, float]:
        """One session's metrics from the scores its device reported."""
        raise NotImplementedError

    def session_metrics_many(self, scores: list, sessions: list) -> list[dict[str, float]]:
        """`session_metrics` of many sessions (the runner asks for a method's sessions of one instant at
        once); a task may compute them together."""
        return [self.session_metrics(s, session) for s, session in zip(scores, sessions)]


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task: unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_for(dataset: str) -> Task:
    for task in TASKS.values():
        if dataset in task.datasets:
            return task
    known = ", ".join(d for t in TASKS.values() for d in t.datasets)
    raise ConfigError(f"dataset: unknown dataset {dataset!r}; choose one of {known}")

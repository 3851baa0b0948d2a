"""Scenario YAML -> a validated, typed `Scenario`.

Everything below this module receives typed objects. Validation reads the
whole file before anything starts and reports every problem at once, each
with its path (``devices.count: must be a positive integer, got -3``).
Durations are seconds or strings with a unit: ``90s``, ``30m``, ``2h``, ``1d``.
The schema, with every default, is in the README ("Writing a scenario"); the
data keys of each task are its `Task.scenario_data`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from duet_bus.bus import SASL_MECHANISMS, SECURITY_PROTOCOLS
from duet_bus.errors import ConfigError
from duet_bus.protocol import REPLY_ENCODINGS, UPLOADS
from duet_bus.shifts import SHIFTS
from duet_bus.tasks import TASKS, task_for

DATASETS = tuple(d for task in TASKS.values() for d in task.datasets)
NOT_BUNDLED = {"ml-1m": "give the path of its ratings.dat",
               "csv": "give the path of your click log (a CSV file with columns user, item, timestamp)",
               "ck+": "its licence forbids shipping it; give the folder with cohn-kanade-images/ and Emotion/"}
_METHOD = re.compile(r"^(base|finetune|duet_no_swa|duet|duet_np([1-9][0-9]?))$")


class ScenarioError(ConfigError):
    """A scenario file has problems; ``problems`` lists them, each with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''}\n  "
                         + "\n  ".join(problems))


@dataclass(frozen=True)
class NetworkProfile:
    """A radio link: payload bytes / bandwidth + latency, each way (paper Table 3 gives bandwidths)."""

    name: str
    bandwidth_mb_s: float  # megabytes (1e6 bytes) per second
    latency_ms: float = 0.0

    def transfer_ms(self, size: int) -> float:
        return self.latency_ms + size / (self.bandwidth_mb_s * 1e6) * 1000


# The paper's Table 3 links. It models bandwidth only; a scenario adds latency.
TABLE3_PROFILES = {
    "4g_5": NetworkProfile("4g_5", 5.0),
    "4g_15": NetworkProfile("4g_15", 15.0),
    "5g_50": NetworkProfile("5g_50", 50.0),
    "5g_100": NetworkProfile("5g_100", 100.0),
}


@dataclass(frozen=True)
class ShiftSpec:
    kind: str
    at_s: float
    fraction: float | None  # of the devices, chosen with the scenario seed
    devices: tuple[int, ...] | None  # or these users' devices (raw user ids)
    params: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind}@{_fmt_duration(self.at_s)}"


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int  # the run's seed: data preparation, training, devices, arrivals, shifts
    seeds: tuple[int, ...]  # the seeds a run repeats with (`seeds:`, `duet run --seeds`); (seed,) for one
    # data
    task: str
    dataset: str
    data_path: str | None
    prep: Any  # the task's data preparation (`PrepConfig`, `ImagePrepConfig`)
    # model
    backbone: str
    checkpoints: dict[str, str]
    epochs: int
    batch_size: int
    lr: float
    width: float  # vision backbones: MobileNetV3's width multiplier
    small_input: bool  # vision backbones: stride 1 in the stem
    n_generators: int
    tau: float
    generator_hidden: int  # h of each generator: a generated layer is H W2, H in x h
    methods: tuple[str, ...]
    finetune_steps: int
    finetune_lr: float
    finetune_recent: int
    # devices
    device_count: int
    users: str | tuple[int, ...]
    network_mix: dict[str, float]
    profiles: dict[str, NetworkProfile]
    compute_factor: float
    deadline_s: float
    upload: str  # what a device uploads (`protocol.UPLOADS`): samples, images as 8-bit pixels, or image features
    batched: bool  # the device side of one instant as one computation (`Fleet.run_many`), or device by device
    timing_share: float  # batched: the share of sessions whose device compute is timed alone
    # arrivals
    arrivals: str
    rate_per_hour: float
    time_scale: float
    shifts: tuple[ShiftSpec, ...]
    # bus and cloud
    bootstrap: str | None
    security: dict  # bus.security as read (the password is named by password_env); {} for none
    bus_kind: str
    workers: int
    max_batch: int
    max_wait_ms: float
    weight_encoding: str
    window_s: float
    duration_s: float
    output: str
    dashboard: bool
    torch_threads: int  # torch's intra-op threads while the run simulates (training before it keeps torch's own)
    source: str = field(default="<scenario>", compare=False)

    def generators(self, method: str) -> int | None:
        """``N_p`` of a generative method (``duet_np3`` -> 3), None for base and finetune."""
        if method == "duet":
            return self.n_generators
        if method == "duet_no_swa":
            return 1
        match = _METHOD.match(method)
        return int(match.group(2)) if match and match.group(2) else None

    def eval_config(self):
        """The scenario's data, model and training as `duet evaluate` would run them (one seed)."""
        from duet_bus.evaluate import EvalConfig
        from duet_bus.finetune import FinetuneConfig
        from duet_bus.models import PPGConfig
        from duet_bus.train import TrainConfig

        patience = task_for(self.dataset).default_train().patience
        return EvalConfig(dataset=self.dataset, data_path=self.data_path, backbone=self.backbone, seeds=(self.seed,),
                          methods=self.methods, prep=self.prep,
                          train=TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                            patience=patience),
                          finetune=FinetuneConfig(steps=self.finetune_steps, lr=self.finetune_lr,
                                                  recent=self.finetune_recent),
                          swa=PPGConfig(n_generators=self.n_generators, tau=self.tau,
                                        hidden_dim=self.generator_hidden), width=self.width,
                          small_input=self.small_input)


# -- the schema --------------------------------------------------------------------------

_UNSET = object()


def _fmt_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class _Reader:
    """Reads a nested mapping, collecting every problem with its path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, doc: Any, path: str, keys: tuple[str, ...]) -> dict:
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            self.fail(path or "(top level)", f"must be a mapping, got {_show(doc)}")
            return {}
        for key in doc:
            if key not in keys:
                self.fail(f"{path}.{key}" if path else str(key),
                          f"unknown key; expected one of {', '.join(keys)}")
        return doc

    def get(self, doc: dict, path: str, key: str, kind: str, default: Any = _UNSET, **limits: Any) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in doc or doc[key] is None and default is None:
            if default is _UNSET:
                self.fail(full, "is required")
                return None
            return default
        value = doc[key]
        checked = _check(value, kind, limits)
        if isinstance(checked, _Problem):
            self.fail(full, f"{checked.message}, got {_show(value)}")
            return default if default is not _UNSET else None
        return checked


class _Problem:
    def __init__(self, message: str) -> None:
        self.message = message


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def _check(value: Any, kind: str, limits: dict) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return _Problem("must be an integer")
        if "min" in limits and value < limits["min"]:
            return _Problem("must be a positive integer" if limits["min"] == 1 else f"must be at least {limits['min']}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return _Problem("must be a number")
        if "gt" in limits and not value > limits["gt"]:
            return _Problem(f"must be greater than {limits['gt']}")
        if "min" in limits and value < limits["min"]:
            return _Problem(f"must be at least {limits['min']}")
        if "lt" in limits and not value < limits["lt"]:
            return _Problem(f"must be less than {limits['lt']}")
        if "max" in limits and value > limits["max"]:
            return _Problem(f"must be at most {limits['max']}")
        return float(value)
    if kind == "duration":
        seconds = parse_duration(value)
        if seconds is None:
            return _Problem("must be a duration (seconds, or a number with s, m, h or d)")
        if "gt" in limits and not seconds > limits["gt"]:
            return _Problem("must be longer than 0")
        return seconds
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            return _Problem("must be a non-empty string")
        if "choices" in limits and value not in limits["choices"]:
            return _Problem(f"must be one of {', '.join(limits['choices'])}{limits.get('note', '')}")
        return value
    if kind == "bool":
        return value if isinstance(value, bool) else _Problem("must be true or false")
    raise AssertionError(kind)


def _seeds(r: "_Reader", top: dict, seed: int) -> tuple[int, ...]:
    if "seeds" not in top:
        return (seed,)
    seeds = top["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds):
        r.fail("seeds", f"must be a list of non-negative integers, got {_show(seeds)}")
        return (seed,)
    if len(set(seeds)) != len(seeds):
        r.fail("seeds", "lists a seed twice")
    if "seed" in top:
        r.fail("seeds", "give either seed or seeds, not both")
    return tuple(seeds)


def apply_overrides(doc: Any, overrides: list[str]) -> Any:
    """``KEY=VALUE`` settings (``model.backbone=din``, ``devices.count=100``) over a scenario document;
    VALUE is read as YAML (``[0, 1]``, ``true``, ``2h``), KEY is a dotted path of mappings."""
    if not overrides:
        return doc
    if not isinstance(doc, dict):
        raise ConfigError("--set: the scenario file does not hold a mapping")
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. model.backbone=din")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
        node = doc
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return doc


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read and validate a scenario file (every problem reported at once), with ``--set`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such scenario file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{where}: not valid YAML: {what}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_scenario(apply_overrides(doc, overrides or []), source=str(path))


def _check_file(r: "_Reader", field: str, value: str | None) -> None:
    """Files a scenario names must exist when it is validated, not only when it runs."""
    if value is not None and not Path(value).exists():
        r.fail(field, f"{value}: no such file (relative paths are taken from the directory you run duet in)")


def parse_scenario(doc: Any, source: str = "<scenario>") -> Scenario:
    r = _Reader()
    top = r.section(doc, "", ("name", "seed", "seeds", "data", "model", "methods", "finetune", "devices",
                              "network_profiles", "arrivals", "shifts", "bus", "cloud", "window", "duration",
                              "output", "dashboard", "torch_threads"))
    if doc is None or not isinstance(doc, dict):
        raise ScenarioError(source, r.problems or ["(top level): must be a mapping, got an empty file"])
    name = r.get(top, "", "name", "str")
    seed = r.get(top, "", "seed", "int", 0, min=0)
    seeds = _seeds(r, top, seed)

    data_keys = tuple(dict.fromkeys(k for t in TASKS.values() for k in t.scenario_data))
    data = r.section(top.get("data"), "data", ("dataset", "path", *data_keys))
    dataset = r.get(data, "data", "dataset", "str", "ml-100k", choices=DATASETS)
    task = task_for(dataset if dataset in DATASETS else "ml-100k")
    data_path = r.get(data, "data", "path", "str", None)
    _check_file(r, "data.path", data_path)
    if dataset in NOT_BUNDLED and data_path is None:
        r.fail("data.path", f"{dataset} is not bundled: {NOT_BUNDLED[dataset]}")
    values = {}
    for key in data:
        if key in data_keys and key not in task.scenario_data:
            owners = [t.name for t in TASKS.values() if key in t.scenario_data]
            r.fail(f"data.{key}", f"only for {' or '.join(owners)} data sets; {dataset} is {task.name}")
    for key, (kind, default, limits) in task.scenario_data.items():
        values[key] = r.get(data, "data", key, kind, default, **limits)
    prep = None
    if all(v is not None for v in values.values()):
        try:
            prep = task.prep_from_scenario(values)
        except ConfigError as exc:
            r.problems.append(str(exc))

    model = r.section(top.get("model"), "model", ("backbone", "checkpoints", "epochs", "batch_size", "lr", "width",
                                                  "small_input", "swa"))
    for key in ("width", "small_input"):
        if key in model and key not in task.model_options:
            r.fail(f"model.{key}", f"only for image backbones; {dataset} is {task.name}")
    checkpoints = r.section(model.get("checkpoints"), "model.checkpoints", ("base", "duet_no_swa", "duet"))
    for key, value in checkpoints.items():
        if not isinstance(value, str):
            r.fail(f"model.checkpoints.{key}", f"must be a file path, got {_show(value)}")
        else:
            _check_file(r, f"model.checkpoints.{key}", value)
    swa = r.section(model.get("swa"), "model.swa", ("generators", "tau", "hidden"))

    methods = top.get("methods", ["base", "finetune", "duet_no_swa", "duet"])
    if not isinstance(methods, list) or not methods:
        r.fail("methods", f"must be a non-empty list, got {_show(methods)}")
        methods = []
    for i, m in enumerate(methods):
        if not isinstance(m, str) or not _METHOD.match(m):
            r.fail(f"methods[{i}]", f"must be base, finetune, duet_no_swa, duet or duet_npN, got {_show(m)}")
    if len(set(map(str, methods))) != len(methods):
        r.fail("methods", "lists a method twice")

    ft = r.section(top.get("finetune"), "finetune", ("steps", "lr", "recent"))

    dev = r.section(top.get("devices"), "devices", ("count", "users", "network", "compute_factor", "deadline",
                                                    "upload", "batched", "timing_share"))
    users = dev.get("users", "first")
    if isinstance(users, list):
        if not users or not all(isinstance(u, int) and not isinstance(u, bool) for u in users):
            r.fail("devices.users", "a list must hold raw user ids (integers)")
        users = tuple(users)
    elif users not in ("first", "random"):
        r.fail("devices.users", f"must be first, random or a list of user ids, got {_show(users)}")

    profiles = dict(TABLE3_PROFILES)
    extra = r.section(top.get("network_profiles"), "network_profiles", tuple(top.get("network_profiles") or ()))
    for pname, spec in extra.items():
        p = r.section(spec, f"network_profiles.{pname}", ("bandwidth_mb_s", "latency_ms"))
        bw = r.get(p, f"network_profiles.{pname}", "bandwidth_mb_s", "float", None, gt=0)
        lat = r.get(p, f"network_profiles.{pname}", "latency_ms", "float", 0.0, min=0)
        if bw is None and pname not in profiles:
            r.fail(f"network_profiles.{pname}.bandwidth_mb_s", "is required for a new profile")
        elif p is not None:
            base = profiles.get(pname)
            profiles[pname] = NetworkProfile(pname, bw if bw is not None else base.bandwidth_mb_s, lat)
    mix_doc = dev.get("network", {"4g_5": 1, "4g_15": 1, "5g_50": 1, "5g_100": 1})
    mix: dict[str, float] = {}
    if not isinstance(mix_doc, dict) or not mix_doc:
        r.fail("devices.network", f"must map profile names to shares, got {_show(mix_doc)}")
    else:
        for pname, share in mix_doc.items():
            if pname not in profiles:
                r.fail(f"devices.network.{pname}", f"unknown profile; known: {', '.join(profiles)} "
                                                  "(add one under network_profiles)")
            elif isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0:
                r.fail(f"devices.network.{pname}", f"must be a positive share, got {_show(share)}")
            else:
                mix[pname] = float(share)

    arr = r.section(top.get("arrivals"), "arrivals", ("kind", "rate_per_hour", "time_scale"))
    arrivals = r.get(arr, "arrivals", "kind", "str", "poisson", choices=("poisson", "replay"))
    if arrivals == "replay" and not task.timestamps:
        r.fail("arrivals.kind", f"{dataset} sessions carry no timestamps to replay; use poisson")

    shifts = []
    shift_docs = top.get("shifts") or []
    if not isinstance(shift_docs, list):
        r.fail("shifts", f"must be a list, got {_show(shift_docs)}")
        shift_docs = []
    for i, sdoc in enumerate(shift_docs):
        shift = _read_shift(r, sdoc, f"shifts[{i}]")
        if shift is not None and task.name not in SHIFTS[shift.kind].TASKS:
            r.fail(f"shifts[{i}].kind", f"{shift.kind} shifts {' and '.join(SHIFTS[shift.kind].TASKS)} devices; "
                                        f"{dataset} is {task.name}; its shifts: "
                                        + ", ".join(k for k, c in SHIFTS.items() if task.name in c.TASKS))
        shifts.append(shift)

    bus = r.section(top.get("bus"), "bus", ("bootstrap", "kind", "security"))
    sec = r.section(bus.get("security"), "bus.security",
                    ("protocol", "sasl_mechanism", "username", "password_env", "ssl_cafile"))
    cloud = r.section(top.get("cloud"), "cloud", ("workers", "max_batch", "max_wait_ms", "weight_encoding"))

    scenario = dict(
        name=name, seed=seed, seeds=seeds,
        task=task.name, dataset=dataset, data_path=data_path, prep=prep,
        backbone=r.get(model, "model", "backbone", "str", task.scenario_model["backbone"], choices=task.backbones,
                       note=task.backbone_note),
        checkpoints={k: v for k, v in checkpoints.items() if isinstance(v, str)},
        epochs=r.get(model, "model", "epochs", "int", task.scenario_model["epochs"], min=1),
        batch_size=r.get(model, "model", "batch_size", "int", task.scenario_model["batch_size"], min=1),
        lr=r.get(model, "model", "lr", "float", task.scenario_model["lr"], gt=0),
        width=r.get(model, "model", "width", "float", 1.0, gt=0),
        small_input=r.get(model, "model", "small_input", "bool", False),
        n_generators=r.get(swa, "model.swa", "generators", "int", 5, min=1),
        tau=r.get(swa, "model.swa", "tau", "float", 0.1, gt=0),
        generator_hidden=r.get(swa, "model.swa", "hidden", "int", 32, min=1),
        methods=tuple(methods),
        finetune_steps=r.get(ft, "finetune", "steps", "int", 10, min=1),
        finetune_lr=r.get(ft, "finetune", "lr", "float", 1e-3, gt=0),
        finetune_recent=r.get(ft, "finetune", "recent", "int", 10, min=1),
        device_count=r.get(dev, "devices", "count", "int", 100, min=1),
        users=users,
        network_mix=mix,
        profiles=profiles,
        compute_factor=r.get(dev, "devices", "compute_factor", "float", 1.0, gt=0),
        deadline_s=r.get(dev, "devices", "deadline", "duration", 2.0, gt=0),
        upload=r.get(dev, "devices", "upload", "str", "samples", choices=UPLOADS),
        batched=r.get(dev, "devices", "batched", "bool", True),
        timing_share=r.get(dev, "devices", "timing_share", "float", 0.01, min=0, max=1),
        arrivals=arrivals,
        rate_per_hour=r.get(arr, "arrivals", "rate_per_hour", "float", 1.0, gt=0),
        time_scale=r.get(arr, "arrivals", "time_scale", "float", 1e-3, gt=0),
        shifts=tuple(s for s in shifts if s is not None),
        bootstrap=r.get(bus, "bus", "bootstrap", "str", None),
        security=dict(
            protocol=r.get(sec, "bus.security", "protocol", "str", "PLAINTEXT", choices=SECURITY_PROTOCOLS),
            sasl_mechanism=r.get(sec, "bus.security", "sasl_mechanism", "str", None, choices=SASL_MECHANISMS),
            username=r.get(sec, "bus.security", "username", "str", None),
            password_env=r.get(sec, "bus.security", "password_env", "str", "DUET_SASL_PASSWORD"),
            ssl_cafile=r.get(sec, "bus.security", "ssl_cafile", "str", None),
        ) if sec else {},
        bus_kind=r.get(bus, "bus", "kind", "str", "kafka", choices=("kafka", "memory")),
        workers=r.get(cloud, "cloud", "workers", "int", 1, min=1),
        max_batch=r.get(cloud, "cloud", "max_batch", "int", 256, min=1),
        max_wait_ms=r.get(cloud, "cloud", "max_wait_ms", "float", 0.0, min=0),
        weight_encoding=r.get(cloud, "cloud", "weight_encoding", "str", "float32",
                              choices=REPLY_ENCODINGS),
        window_s=r.get(top, "", "window", "duration", 1.0, gt=0),
        duration_s=r.get(top, "", "duration", "duration", gt=0),
        output=r.get(top, "", "output", "str", f"runs/{name or 'scenario'}"),
        dashboard=r.get(top, "", "dashboard", "bool", True),
        torch_threads=r.get(top, "", "torch_threads", "int", 1, min=1),
        source=source,
    )
    if scenario["bus_kind"] == "memory" and scenario["bootstrap"]:
        r.fail("bus.bootstrap", "a memory bus has no bootstrap servers")
    if sec:
        _check_file(r, "bus.security.ssl_cafile", scenario["security"]["ssl_cafile"])
    if sec and not scenario["bootstrap"]:
        r.fail("bus.security", "only for a cluster named in bus.bootstrap (the embedded broker is plain)")
    duration = scenario["duration_s"]
    for i, s in enumerate(scenario["shifts"]):
        if duration is not None and s.at_s >= duration:
            r.fail(f"shifts[{i}].at", f"must be before the end of the run ({_fmt_duration(duration)}), "
                                      f"got {_fmt_duration(s.at_s)}")
    if len(seeds) > 1 and scenario["checkpoints"]:
        r.fail("model.checkpoints", "cannot be combined with several seeds: each seed trains its own models")
    if r.problems:
        raise ScenarioError(source, r.problems)
    return Scenario(**scenario)


def _read_shift(r: _Reader, doc: Any, path: str) -> ShiftSpec | None:
    if not isinstance(doc, dict):
        r.fail(path, f"must be a mapping with kind and at, got {_show(doc)}")
        return None
    kind = r.get(doc, path, "kind", "str", choices=tuple(SHIFTS),
                 note=" (a shift of your own: register it in a module given with --plugin)")
    known = ("kind", "at", "fraction", "devices") + (tuple(SHIFTS[kind].PARAMS) if kind in SHIFTS else ())
    r.section(doc, path, known)
    at = r.get(doc, path, "at", "duration")
    fraction = r.get(doc, path, "fraction", "float", None, gt=0, max=1)
    devices = doc.get("devices")
    if devices is not None:
        if not isinstance(devices, list) or not devices or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in devices):
            r.fail(f"{path}.devices", f"must be a list of raw user ids, got {_show(devices)}")
            devices = None
        else:
            devices = tuple(devices)
    if "fraction" in doc and "devices" in doc:
        r.fail(path, "give either fraction or devices, not both")
    elif "fraction" not in doc and "devices" not in doc:
        fraction = 1.0
    params: dict[str, Any] = {}
    if kind in SHIFTS:
        for problem in SHIFTS[kind].check_params(doc, params):
            r.fail(f"{path}.{problem[0]}", problem[1])
    if kind is None or at is None:
        return None
    return ShiftSpec(kind, at, fraction, devices, params)

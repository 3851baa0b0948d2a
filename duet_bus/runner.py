"""The scenario runner: a simpy discrete-event co-simulation with the real bus.

Virtual time belongs to simpy. Each device is a simpy process that waits for
its next session (Poisson arrivals, or the dataset's own timestamps replayed
with a time scale), cuts the session from its stream (`data.streams`: a
recommendation device's clicks or a camera device's pictures, made by the
scenario's task) and
hands it to the runner; each shift is a process that changes some devices'
streams at its time. Arrivals are aligned to the scenario's ``window`` so that
sessions of one window start at the same virtual instant.

At every instant with sessions the runner leaves simpy and does the real work:
every session that needs the cloud goes over the bus to the real generator
service and back, all of that instant's requests at once (so the cloud sees
real batches); then the device-side methods (base, on-device fine-tuning).
By default each method's sessions of the instant are one computation
(`Fleet.run_many`, `devices.batched`), with a share of them also computed
alone to time what one device spends; otherwise device by device. A run may
also be one shard of a run spread over processes (`Shard`, `duet_bus.shards`). What the code can measure is measured (bus round trip, cloud
time, generation, fine-tuning, inference); the radio link is modelled
(`NetworkProfile`: bytes / bandwidth + latency each way). Each session's
delay enters virtual time: a device's next session starts no earlier than
the moment every method of its previous one had its weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from operator import attrgetter
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import simpy
import torch

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import checkpoint
from duet_bus.broker import BrokerError, EmbeddedBroker
from duet_bus.bus import KafkaBus, MemoryBus, Security, Topics
from duet_bus.checkpoint import Checkpoint
from duet_bus.data.streams import DeviceSession
from duet_bus.errors import ConfigError
from duet_bus.finetune import FinetuneConfig
from duet_bus.protocol import SessionReport
from duet_bus.report import write_run, write_seeds
from duet_bus.scenario import NetworkProfile, Scenario
from duet_bus.shifts import SHIFTS
from duet_bus.tasks import task_named

LOCAL_METHODS = ("base", "finetune")
RUN_RETENTION = 8 << 20  # bytes a partition of the in-process bus keeps in a run (`bus.kind: memory`)
YOUNG_COLLECTION_EVERY = 10_000  # allocations between the garbage collector's young collections in a run
log = logging.getLogger("duet.runner")


@dataclass(slots=True)
class SessionRecord:
    """One method's result for one session: a row of ``sessions.csv``."""

    session_id: str
    device_id: str
    user: int  # raw id of the owner (user, camera device) whose clicks or pictures the session holds
    method: str
    profile: str
    start_s: float  # virtual
    index: int  # the device's n-th session
    samples: int
    metrics: dict[str, float]  # the task's per-session metrics (AUC..., accuracy...): columns of their own
    fallback: bool
    upload_bytes: int
    download_bytes: int
    upload_ms: float  # modelled
    download_ms: float  # modelled
    bus_ms: float  # measured
    cloud_ms: float  # measured (includes generation)
    generation_ms: float  # measured
    finetune_ms: float  # measured x compute_factor
    compute_ms: float  # measured x compute_factor
    total_ms: float
    device_timing: str = "measured"  # finetune_ms and compute_ms: "measured" alone, or "calibrated" (batched)

    def __getitem__(self, key: str) -> Any:
        """A field or one of the metrics by name: the report reads a record as it reads a ``sessions.csv``
        row, without a dict per row."""
        metrics = self.metrics
        return metrics[key] if key in metrics else getattr(self, key)

    def row(self) -> dict:
        """The record as a ``sessions.csv`` row: each of the task's metrics a column of its own, where the
        field ``metrics`` is."""
        out = dict(zip(_BEFORE_METRICS, _fields_before_metrics(self)))
        out.update(self.metrics)
        out.update(zip(_AFTER_METRICS, _fields_after_metrics(self)))
        return out


_SLOTS = [f.name for f in fields(SessionRecord)]
_BEFORE_METRICS, _AFTER_METRICS = _SLOTS[:_SLOTS.index("metrics")], _SLOTS[_SLOTS.index("metrics") + 1:]
_fields_before_metrics, _fields_after_metrics = attrgetter(*_BEFORE_METRICS), attrgetter(*_AFTER_METRICS)


@dataclass
class ShiftEvent:
    label: str
    kind: str
    at_s: float
    devices: list[str]


@dataclass
class MethodTotals:
    """A method's running count and sum of the primary metric, overall and on the devices of the last
    shift since it (what the dashboard shows without going over every record)."""

    sessions: int = 0
    total: float = 0.0
    since_shift: int = 0
    since_shift_total: float = 0.0


@dataclass
class RunState:
    """What the dashboard and the report read; the runner keeps it current."""

    scenario: Scenario
    records: list[SessionRecord] = field(default_factory=list)
    totals: dict[str, MethodTotals] = field(default_factory=dict)
    shifted: set[str] = field(default_factory=set)  # the devices of the last shift
    shifts: list[ShiftEvent] = field(default_factory=list)
    now_s: float = 0.0
    wall_start: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0
    sessions: int = 0
    fallbacks: int = 0
    # Every scoring that needs the cloud should end answered or fallen back; the report counts
    # what ended in neither (an exception escaped the device, or the run was cut) as lost.
    cloud_started: int = 0
    cloud_answered: int = 0
    cloud_fell_back: int = 0
    devices_active: int = 0
    finished: bool = False
    interrupted: bool = False
    cloud: list[GeneratorService] = field(default_factory=list)
    fleet: Fleet | None = None

    def __repr__(self) -> str:
        # Short: asyncio formats the repr of the task that returns this state when it puts the SIGINT handler
        # back (signal.getsignal), and a repr of every record cost 0.4 s at 10,000 devices.
        return f"RunState({self.scenario.name!r}, {len(self.records)} records, finished={self.finished})"


@dataclass
class _Job:
    device: Any  # a `data.streams` stream: DeviceStream, ImageStream
    session: DeviceSession
    start_s: float
    done: simpy.Event
    owner: int  # raw id of the owner whose session it is
    delay_s: float = 0.0


def choose_users(scenario: Scenario, prepared: Any, rng: np.random.Generator) -> np.ndarray:
    """The owner (user, camera device) each device starts with: the first ones, random ones, or the
    listed raw ids.

    More devices than owners reuse owners round-robin (each device keeps its own stream and log).
    """
    raw_ids, streaming = task_named(scenario.task).stream_owners(prepared)  # owners with held-out sessions
    if isinstance(scenario.users, tuple):
        index = {int(raw): i for i, raw in enumerate(raw_ids)}
        missing = [u for u in scenario.users if u not in index]
        if missing:
            raise ConfigError(f"devices.users: {missing[0]} is not an owner in {prepared.name}")
        pool = np.array([index[u] for u in scenario.users])
    elif scenario.users == "random":
        pool = rng.permutation(streaming)
    else:
        pool = streaming
    if len(pool) == 0:
        raise ConfigError("devices.users: no user has held-out sessions to stream (raise data.holdout)")
    return pool[np.arange(scenario.device_count) % len(pool)]


@dataclass(frozen=True)
class Shard:
    """Which of a run's devices this process simulates: device ``i`` belongs to shard ``i % count``.

    Its fleet takes replies on partition ``index`` of the weights topic; ``run_id`` is shared by all
    the run's shards (session ids on the wire, the records they publish). ``cloud``: whether this process
    runs the run's cloud workers (one process does; the shards of `duet run --shards` do not).
    """

    index: int = 0
    count: int = 1
    run_id: str = ""
    cloud: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"--shard: must be k/N with 0 <= k < N, got {self.index}/{self.count}")


class Runner:
    def __init__(self, scenario: Scenario, prepared: Any, checkpoints: dict[str, Checkpoint], bus,
                 topics: Topics | None = None, on_step: Callable[[RunState], None] | None = None,
                 shard: Shard | None = None) -> None:
        self.scenario = scenario
        self.shard = shard or Shard()
        self.prepared = prepared
        self.checkpoints = checkpoints
        self.bus = bus
        self.topics = topics or Topics()
        self.on_step = on_step
        self.state = RunState(scenario)
        self.env = simpy.Environment()
        self.pending: list[_Job] = []
        seed = scenario.seed
        self._rng = lambda *key: np.random.default_rng([seed, *key])
        self.task = task_named(scenario.task)
        users = choose_users(scenario, prepared, self._rng(0))
        self.recent = scenario.finetune_recent if "finetune" in scenario.methods else 0
        # Everything drawn per device is drawn for all of the run's devices, so a shard's devices are
        # exactly those of the one-process run.
        self.device_total = len(users)
        k, n = self.shard.index, self.shard.count
        self.devices = [self.task.device_stream(i, prepared, int(users[i])) for i in range(k, len(users), n)]
        names = list(scenario.network_mix)
        shares = np.array([scenario.network_mix[n] for n in names])
        picks = self._rng(1).choice(len(names), size=len(users), p=shares / shares.sum())
        self.profile: dict[str, NetworkProfile] = {
            d.device_id: scenario.profiles[names[picks[d.index]]] for d in self.devices}
        self.shifts = [SHIFTS[s.kind](prepared, s.params) for s in scenario.shifts]
        if scenario.arrivals == "replay":  # the first session of any of the run's devices starts at 0
            every = self.devices if n == 1 else (self.task.device_stream(i, prepared, int(u))
                                                 for i, u in enumerate(users))
            self._first_time = min((d.next_time() for d in every if not d.exhausted), default=0)
        else:
            self._first_time = 0
        self.finetune = FinetuneConfig(steps=scenario.finetune_steps, lr=scenario.finetune_lr,
                                       recent=scenario.finetune_recent)

    # -- simpy processes -------------------------------------------------------------------------

    def _next_start(self, device, rng: np.random.Generator, last: float) -> float:
        """The next arrival: counted from the last one (not from when its delay ended), so that
        measured delays move a start only when they overlap the next arrival; a run stays
        reproducible unless a session's delay is longer than the gap to the next."""
        s = self.scenario
        if s.arrivals == "poisson":
            t = last + rng.exponential(3600.0 / s.rate_per_hour)
        else:
            t = (device.next_time() - self._first_time) * s.time_scale
        return math.ceil(max(t, self.env.now) / s.window_s - 1e-9) * s.window_s

    def _device(self, device):
        try:
            yield from self._sessions(device)
        finally:
            self.state.devices_active -= 1

    def _sessions(self, device):
        rng = self._rng(2, device.index)
        start = 0.0
        while not device.exhausted:
            start = self._next_start(device, rng, start)
            if start >= self.scenario.duration_s:
                return
            yield self.env.timeout(start - self.env.now)
            if device.exhausted:  # nothing left to click
                return
            owner = device.owner_id
            job = _Job(device, device.next_session(rng, self.recent), self.env.now, self.env.event(), owner)
            self.pending.append(job)
            yield job.done
            delay, job = job.delay_s, None  # the session's samples are not kept until the next one
            yield self.env.timeout(delay)

    def _shift(self, index: int):
        spec = self.scenario.shifts[index]
        yield self.env.timeout(spec.at_s)
        if spec.devices is not None:
            wanted = set(spec.devices)
            chosen = [d for d in self.devices if d.home_id in wanted]
        else:
            count = max(1, round(spec.fraction * self.device_total))
            picked = set(self._rng(3, index).choice(self.device_total, count, replace=False).tolist())
            chosen = [d for d in self.devices if d.index in picked]
        for device in chosen:  # each device's own randomness: the same in whichever shard it runs
            self.shifts[index].apply(device, self._rng(3, index, device.index))
        self.state.shifts.append(ShiftEvent(spec.label, spec.kind, spec.at_s, [d.device_id for d in chosen]))
        self.state.shifted = {d.device_id for d in chosen}
        for totals in self.state.totals.values():
            totals.since_shift = 0
            totals.since_shift_total = 0.0

    # -- the real work ---------------------------------------------------------------------------

    def _agent(self, device, method: str) -> DeviceAgent:
        """The device's agent for a method: made for the session (a device keeps nothing between sessions
        but its stream: every session starts from the global classifier or asks the cloud)."""
        ckpt = self.checkpoints["base" if method in LOCAL_METHODS else method]
        return DeviceAgent(device.device_id, ckpt, self.state.fleet, method)

    async def _serve(self, jobs: list[_Job]) -> None:
        fleet = self.state.fleet
        cloud = [m for m in self.scenario.methods if m not in LOCAL_METHODS]
        local = [m for m in self.scenario.methods if m in LOCAL_METHODS]
        # Method by method, each method's sessions of this instant together.
        requests = [(job, m, replace(job.session, session_id=f"{job.session.session_id}-{m}"))
                    for m in cloud for job in jobs]
        self.state.cloud_started += len(requests)
        results: dict[tuple[int, str], SessionReport] = {}
        if self.scenario.batched:
            # The same work, each method's sessions as one computation (`Fleet.run_many`). The device-side
            # methods run after the cloud's, not beside them: a session timed alone (`Calibration`) must not
            # share the CPU with the cloud's generation (beside it, vision_shift's base device p50 was 90 ms;
            # after it, 29).
            outcome = await asyncio.gather(*(fleet.run_many(
                [self._agent(job.device, m) for job in jobs],
                [s for _, m2, s in requests if m2 == m]) for m in cloud), return_exceptions=True)
            reports = [report for out in outcome
                       for report in ([out] * len(jobs) if isinstance(out, BaseException) else out)]
        else:
            reports = await asyncio.gather(*(fleet.run(self._agent(job.device, m), s) for job, m, s in requests),
                                           return_exceptions=True)
        for (job, m, session), report in zip(requests, reports):
            if isinstance(report, BaseException):
                log.error("session %s lost", session.session_id, exc_info=report)
                continue
            self.state.cloud_answered += not report.fallback
            self.state.cloud_fell_back += report.fallback
            results[id(job), m] = report
        for m in local:
            if self.scenario.batched:
                batch = await fleet.run_many([self._agent(job.device, m) for job in jobs], [job.session for job in jobs])
            else:
                batch = [await fleet.run(self._agent(job.device, m), job.session) for job in jobs]
            for job, report in zip(jobs, batch):
                results[id(job), m] = report
        metrics = {}
        for method in self.scenario.methods:  # each method's sessions' metrics together
            done = [job for job in jobs if (id(job), method) in results]
            for job, values in zip(done, self.task.session_metrics_many(
                    [results[id(job), method].scores for job in done], [job.session for job in done])):
                metrics[id(job), method] = values
        for job in jobs:
            for method in self.scenario.methods:
                if (id(job), method) not in results:
                    continue
                record = self._record(job, method, results[id(job), method], metrics[id(job), method])
                job.delay_s = max(job.delay_s, record.total_ms / 1000)
                self._add(record)
        self.state.sessions += len(jobs)

    def _add(self, record: SessionRecord) -> None:
        state = self.state
        state.records.append(record)
        state.fallbacks += record.fallback
        totals = state.totals.setdefault(record.method, MethodTotals())
        value = record.metrics[self.task.primary]
        totals.sessions += 1
        totals.total += value
        if record.device_id in state.shifted:
            totals.since_shift += 1
            totals.since_shift_total += value

    def _record(self, job: _Job, method: str, report: SessionReport, metrics: dict[str, float]) -> SessionRecord:
        d = report.delay_ms
        factor = self.scenario.compute_factor
        profile = self.profile[job.device.device_id]
        up, down = report.payload_bytes.get("upload", 0), report.payload_bytes.get("download", 0)
        upload_ms = profile.transfer_ms(up) if up else 0.0
        download_ms = profile.transfer_ms(down) if down else 0.0
        # A batched run's sessions not timed alone carry calibrated device times (`Fleet.run_many`).
        timing = "calibrated" if "device_compute_calibrated_ms" in d else "measured"
        compute = (d.get("device_compute_ms", d.get("device_compute_calibrated_ms", 0.0)) + d.get("embed_ms", 0.0)) * factor
        finetune = d.get("finetune_ms", d.get("finetune_calibrated_ms", 0.0)) * factor
        if report.fallback:
            waited = self.scenario.deadline_s * 1000
        else:
            waited = d.get("bus_ms", 0.0) + d.get("cloud_ms", 0.0)
        return SessionRecord(
            session_id=job.session.session_id, device_id=job.device.device_id,
            user=job.owner, method=method, profile=profile.name,
            start_s=job.start_s, index=job.device.sessions_done, samples=len(job.session.samples),
            metrics=metrics, fallback=report.fallback, upload_bytes=up, download_bytes=down, upload_ms=upload_ms,
            download_ms=download_ms, bus_ms=d.get("bus_ms", 0.0), cloud_ms=d.get("cloud_ms", 0.0),
            generation_ms=d.get("generation_ms", 0.0), finetune_ms=finetune, compute_ms=compute,
            total_ms=upload_ms + waited + download_ms + finetune + compute, device_timing=timing,
        )

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> RunState:
        s = self.scenario
        bus = self.bus
        await bus.ensure_topics(self.topics.all())
        services = cloud_workers(s, bus, self.checkpoints, self.topics) if self.shard.cloud else []
        fleet = Fleet(bus, FleetConfig(fleet_id=f"run-{s.name}", deadline_s=s.deadline_s, topics=self.topics,
                                       finetune=self.finetune, upload=s.upload, timing_share=s.timing_share,
                                       reply_partition=self.shard.index, run_id=self.shard.run_id))
        stop = asyncio.Event()
        tasks = []
        self.state.cloud, self.state.fleet = services, fleet
        try:
            for service in services:
                await service.start()
                tasks.append(asyncio.create_task(service.run(stop)))
            await fleet.start()
            if services:
                await cloud_ready(services, self.topics)
            for i in range(len(s.shifts)):
                self.env.process(self._shift(i))
            self.state.devices_active = len(self.devices)
            for device in self.devices:
                self.env.process(self._device(device))
            await self._loop()
            self.state.finished = True
        except asyncio.CancelledError:
            self.state.interrupted = True
            raise
        finally:
            await stop_cloud(services, tasks, stop, before_services=fleet.stop)
            self._tick(min(self.env.now, s.duration_s) if not self.state.finished else s.duration_s)
        return self.state

    async def _loop(self) -> None:
        env, duration = self.env, self.scenario.duration_s
        while env.peek() < duration:
            now = env.peek()
            while env.peek() == now:
                env.step()
            if self.pending:  # instants without sessions (a device's delay ending) have nothing to show
                jobs, self.pending = sorted(self.pending, key=lambda j: j.device.index), []
                await self._serve(jobs)
                for job in jobs:
                    job.done.succeed()
                self._tick(now)

    def _tick(self, now: float) -> None:
        self.state.now_s = now
        self.state.wall_s = time.perf_counter() - self.state.wall_start
        if self.on_step is not None:
            self.on_step(self.state)


def cloud_workers(scenario: Scenario, bus, checkpoints: dict[str, Checkpoint], topics: Topics) -> list[GeneratorService]:
    """The run's cloud: ``cloud.workers`` generator services in one consumer group, serving its DUET models."""
    versions = [c for m, c in checkpoints.items() if m not in LOCAL_METHODS]
    return [GeneratorService(bus, versions, CloudConfig(
        group_id=f"duet-run-{scenario.name}", max_batch=scenario.max_batch, max_wait_ms=scenario.max_wait_ms,
        weight_encoding=scenario.weight_encoding, topics=topics)) for _ in range(scenario.workers)]


async def stop_cloud(services: list[GeneratorService], tasks: list[asyncio.Task], stop: asyncio.Event,
                     before_services: Callable[[], Any] | None = None) -> None:
    """Stop the workers' loops (``stop``; each gets 10 s to finish its batch), then the services."""
    stop.set()
    for task in tasks:
        try:
            await asyncio.wait_for(task, 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
    if before_services is not None:
        await before_services()
    for service in services:
        await service.stop()


async def cloud_ready(services: list[GeneratorService], topics: Topics, timeout_s: float = 30.0) -> None:
    """Wait until the workers' group owns every session partition: no session waits for a rebalance."""
    wanted = {(topics.sessions, p) for p in range(topics.session_partitions)}
    deadline = time.monotonic() + timeout_s
    while set().union(*(svc.consumer.assignment() for svc in services)) != wanted:
        if time.monotonic() > deadline:
            raise BrokerError(f"the cloud workers were not assigned the {topics.sessions} partitions "
                              f"within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


# -- a whole run ------------------------------------------------------------------------------------

def scenario_doc(scenario: Scenario) -> dict:
    """The scenario as results.json records it, with its task's per-session metrics."""
    doc = asdict(scenario)
    task = task_named(scenario.task)
    doc["profiles"] = {name: asdict(p) for name, p in scenario.profiles.items()}
    doc["shifts"] = [asdict(sh) for sh in scenario.shifts]
    doc["devices"] = scenario.device_count
    doc["generators"] = {m: scenario.generators(m) for m in scenario.methods if scenario.generators(m)}
    doc["metrics"], doc["primary"] = list(task.session_metrics_names), task.primary
    return json.loads(json.dumps(doc))  # plain JSON types, as the file will hold them


def load_checkpoints(scenario: Scenario, prepared: Any, progress=None,
                     cache_dir: Path | None = None) -> dict[str, Checkpoint]:
    """The scenario's checkpoints: the given files, the rest trained once and cached (by default next to
    the output, in ``.checkpoints``)."""
    needed = {"base" if m in LOCAL_METHODS else m for m in scenario.methods}
    out: dict[str, Checkpoint] = {}
    config = scenario.eval_config()
    for method in sorted(needed):
        if method in scenario.checkpoints:
            ckpt = checkpoint.load(scenario.checkpoints[method])
            if ckpt.prep != prepared.config or ckpt.dataset != prepared.name:
                raise ConfigError(f"model.checkpoints.{method}: {scenario.checkpoints[method]} was trained on "
                                  f"{ckpt.dataset} with {ckpt.prep}, the scenario streams {prepared.name} with "
                                  f"{prepared.config}; streamed sessions must be held out of training "
                                  f"(`duet train --holdout {prepared.config.holdout}`)")
        else:
            ckpt = checkpoint.cached(cache_dir or Path(scenario.output).parent / ".checkpoints", config, prepared, method,
                                     scenario.seed, progress=progress)
        if ckpt.model.generative == (method == "base"):
            raise ConfigError(f"model.checkpoints.{method}: {ckpt.model_version} is not a {method} model")
        out[method] = ckpt
    return out


def prepare_data(scenario: Scenario) -> Any:
    """Load and prepare the scenario's data; check the parts of the scenario that depend on it."""
    task = task_named(scenario.task)
    prepared = task.prepare(scenario.eval_config(), scenario.seed)
    # What only the data can tell (unknown owner ids, genres), before anything is trained.
    chosen = choose_users(scenario, prepared, np.random.default_rng([scenario.seed, 0]))
    raw_ids = task.stream_owners(prepared)[0]
    users = {int(raw_ids[u]) for u in chosen}
    for i, spec in enumerate(scenario.shifts):
        SHIFTS[spec.kind](prepared, spec.params)
        absent = [u for u in spec.devices or () if u not in users]
        if absent:
            raise ConfigError(f"shifts[{i}].devices: owner {absent[0]} has no device in this run "
                              f"(devices.users / devices.count decide which owners do)")
    return prepared


def kafka_security(scenario: Scenario) -> Security | None:
    """The scenario's ``bus.security`` with the password read from its environment variable."""
    if not scenario.security:
        return None
    settings = dict(scenario.security)
    env = settings.pop("password_env")
    password = os.environ.get(env)
    if settings["protocol"].startswith("SASL_") and password is None:
        raise ConfigError(f"bus.security: ${env} is not set (the SASL password is read from it)")
    try:
        return Security(**settings, password=password)
    except ConfigError as exc:
        raise ConfigError(f"bus.security: {exc}") from exc


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for a block, then put back.

    A run's own Python (simpy, the bus, records) is most of its time, and its device and cloud batches
    are small and run on the event loop's executor threads, as in `duet cloud` and `duet devices` (why one
    thread serves them best: `duet_bus.process`). On 2 cores one thread ran a 10,000-device scenario
    1.1-1.5x as fast as two (`make bench-runner` measures it).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def young_collections(every: int = YOUNG_COLLECTION_EVERY):
    """Python's cyclic garbage collector looking at new objects every ``every`` allocations (instead of 700)
    for a block, then put back.

    Each instant of a run allocates many short-lived containers (sessions, batches, futures, records). With
    the default threshold many are still alive when the youngest generation is collected, so they are
    promoted, and their promotion starts full collections, each of which walks every device and record of
    the run: 17.7 s of a 95 s run at 100,000 devices (`gc.callbacks`), 2.0 s at 10,000 allocations.
    Collection changes no result; cyclic garbage waits a little longer.
    """
    before = gc.get_threshold()
    gc.set_threshold(every, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def run_async(scenario: Scenario, prepared: Any, checkpoints: dict[str, Checkpoint], bootstrap: str | None,
                    on_step: Callable[[RunState], None] | None = None, topics: Topics | None = None,
                    security: Security | None = None, shard: Shard | None = None,
                    then: Callable[[Any, RunState], Any] | None = None) -> RunState:
    """One run (or one shard of it) on its bus; ``then(bus, state)`` is awaited on the same bus after it."""
    bus = MemoryBus(RUN_RETENTION) if scenario.bus_kind == "memory" else KafkaBus(bootstrap, security=security)
    await bus.start()
    try:
        with torch_threads(scenario.torch_threads), young_collections():
            state = await Runner(scenario, prepared, checkpoints, bus, topics=topics, on_step=on_step,
                                 shard=shard).run()
        if then is not None:
            await then(bus, state)
        return state
    finally:
        await bus.stop()


def run_interruptible(start: Callable[[Callable[[RunState], None]], Awaitable[RunState]],
                      on_step: Callable[[RunState], None] | None = None) -> RunState:
    """``asyncio.run(start(step))`` for a run that calls ``step`` at each instant (and passes it to
    ``on_step``); on Ctrl-C, the run's state as of its end, marked interrupted: its sessions so far are
    reported."""
    holder: dict[str, RunState] = {}

    def step(s: RunState) -> None:
        holder["state"] = s
        if on_step is not None:
            on_step(s)

    try:
        return asyncio.run(start(step))
    except KeyboardInterrupt:
        state = holder.get("state")
        if state is None:
            raise
        state.interrupted = True
        return state


def run_scenario(scenario: Scenario, prepared: Any, checkpoints: dict[str, Checkpoint],
                 on_step: Callable[[RunState], None] | None = None) -> tuple[dict, Path]:
    """Run a scenario end to end and write its report; return the results document and the output folder.

    The embedded broker (when the scenario names no bootstrap servers) lives
    exactly as long as the run, Ctrl-C included; on Ctrl-C the sessions done
    so far are still written, marked as interrupted.
    """
    security = kafka_security(scenario)  # a missing password stops the run before anything starts
    broker = EmbeddedBroker() if scenario.bus_kind == "kafka" and not scenario.bootstrap else None
    try:
        if broker is not None:
            broker.start()
        bootstrap = broker.bootstrap if broker is not None else scenario.bootstrap
        state = run_interruptible(lambda step: run_async(scenario, prepared, checkpoints, bootstrap, step,
                                                         security=security), on_step)
    finally:
        if broker is not None:
            broker.stop()
    out = Path(scenario.output)
    doc = write_run(out, scenario_doc(scenario), state.records, state.shifts, run_figures(state, checkpoints))
    return doc, out


def run_figures(state: RunState, checkpoints: dict[str, Checkpoint]) -> dict:
    """A run's ``run`` section of ``results.json``: time, sessions, the cloud and the bus, the fleet."""
    return {"virtual_s": state.now_s, "wall_s": state.wall_s, "speedup": state.now_s / max(state.wall_s, 1e-9),
            "sessions": state.sessions, "finished": state.finished, "interrupted": state.interrupted,
            "checkpoints": {m: c.model_version for m, c in checkpoints.items()},
            "cloud": cloud_figures(state.cloud),
            "over_the_bus": {"started": state.cloud_started, "answered": state.cloud_answered,
                             "fell_back": state.cloud_fell_back,
                             "lost": state.cloud_started - state.cloud_answered - state.cloud_fell_back},
            "fleet": asdict(state.fleet.stats) if state.fleet else {}}


def cloud_figures(services: list[GeneratorService]) -> dict:
    return {"workers": len(services), "served": sum(c.stats.served for c in services),
            "batches": sum(c.stats.batches for c in services),
            "dead_letters": sum(c.stats.dead_letters for c in services),
            "internal_errors": sum(c.stats.internal_errors for c in services),
            "delivery_retries": sum(c.stats.delivery_retries for c in services)}


def run_seeds(scenario: Scenario, on_step: Callable[[RunState], None] | None = None,
              training: Callable[[], Any] = contextlib.nullcontext,
              on_seed: Callable[[int], None] | None = None) -> tuple[dict, Path]:
    """Run the scenario once per seed of ``scenario.seeds`` (data, training, devices and arrivals all
    seeded by it; checkpoints cached beside the output, as for one run), each into ``<output>/seed-K``,
    then write the report over seeds into ``<output>`` (`report.summarize_seeds`). A seed that is
    interrupted ends the run; the report covers the seeds done."""
    out = Path(scenario.output)
    folders: list[tuple[int, Path]] = []
    for seed in scenario.seeds:
        one = replace(scenario, seed=seed, seeds=(seed,), output=str(out / f"seed-{seed}"))
        if on_seed is not None:
            on_seed(seed)
        prepared = prepare_data(one)
        with training() as progress:  # a progress display while a seed's models train, if the caller has one
            checkpoints = load_checkpoints(one, prepared, progress, cache_dir=out.parent / ".checkpoints")
        doc, folder = run_scenario(one, prepared, checkpoints, on_step=on_step)
        folders.append((seed, folder))
        if doc["run"]["interrupted"]:
            break
    return write_seeds(out, scenario_doc(scenario), folders), out

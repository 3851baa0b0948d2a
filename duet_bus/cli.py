"""`duet ...`: the command line.

Every user mistake surfaces as a `DuetError` and is printed as one line,
without a traceback; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from duet_bus.errors import ConfigError, DuetError

# Piped output (CI logs, `| tee`) gets a width the Table-1 layout fits in.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True, soft_wrap=True)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m", "csv", "fashion-mnist", "ck+"],
                   help="ml-100k / ml-1m / csv (a click log of your own: columns user, item, timestamp; by "
                        "--data-path): recommendation; fashion-mnist, ck+ (by --data-path): image classification")
    p.add_argument("--data-path", help="GroupLens u.data / ratings.dat (or its folder; ML-100k is bundled), the "
                                       "folder of the four Fashion-MNIST idx files, or CK+'s folder")
    p.add_argument("--backbone", help="din, sasrec (default), gru4rec or one a --plugin registers; "
                                      "mobilenetv3_small (default), mobilenetv3_large")
    p.add_argument("--epochs", type=int, help="at most; early stopping on validation (default 30; images 6)")
    p.add_argument("--patience", type=int, help="epochs without a better validation score (default 5; images 3)")
    p.add_argument("--batch-size", type=int,
                   help="groups of 1 positive + 4 negatives (default 256); images: sessions (default 64)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3; images 2e-3)")
    p.add_argument("--gamma", type=float, default=1.0, help="session weighting gamma^t (1 = uniform)")
    p.add_argument("--session-length", type=int,
                   help="training interactions per session (default 5); images per session (default 6)")
    p.add_argument("--holdout", type=float, help="most recent fraction kept out of training for `duet run` "
                                                 "(default 0; images 0.2)")
    rec = p.add_argument_group("recommendation")
    rec.add_argument("--history-len", type=int, default=10, help="L: history and real-time samples per session")
    rec.add_argument("--eval-negatives", type=int, default=100, help="sampled negatives per test target")
    img = p.add_argument_group("images")
    img.add_argument("--devices", type=int, default=100, help="devices made by the label-skew partition")
    img.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label skew")
    img.add_argument("--camera", type=float, default=1.0, help="strength of each device's camera (0: none)")
    img.add_argument("--realtime", type=int, default=2, help="real-time images at the start of each session")
    img.add_argument("--max-images", type=int, default=20_000, help="seeded subset of the 70,000 images (0: all)")
    img.add_argument("--image-size", type=int, default=224, help="CK+ frames are resized to this (default 224)")
    img.add_argument("--width", type=float, default=1.0, help="MobileNetV3 width multiplier")
    img.add_argument("--small-input", action="store_true", help="stride 1 in the stem: finer, 2.7x slower")
    swa = p.add_argument_group("generator")
    swa.add_argument("--np", dest="n_generators", type=int, default=5, help="SWA generators N_p for `duet`")
    swa.add_argument("--tau", type=float, default=0.1, help="SWA temperature")
    swa.add_argument("--swa-p-grad", action="store_true",
                     help="let gradients flow through the SWA weights p (default: p is detached)")
    swa.add_argument("--swa-joint-p", action="store_true",
                     help="one SWA p for all dynamic layers (default: one p per layer)")
    swa.add_argument("--generator-hidden", type=int, default=32,
                     help="h of each generator (a generated layer is H W2 with H in x h): its size and cost")


def _eval_config(args: argparse.Namespace):
    from duet_bus.evaluate import METHODS, EvalConfig
    from duet_bus.models import PPGConfig
    from duet_bus.tasks import task_for

    counts = (("--seeds", args.seeds), ("--np", args.n_generators), ("--generator-hidden", args.generator_hidden))
    for flag, value in counts:
        if value < 1:
            raise DuetError(f"{flag}: must be a positive integer, got {value}")
    task = task_for(args.dataset)
    given = {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size, "lr": args.lr}
    train = replace(task.default_train(), gamma=args.gamma, **{k: v for k, v in given.items() if v is not None})
    return EvalConfig(
        dataset=args.dataset,
        data_path=args.data_path,
        backbone=args.backbone or task.default_backbone,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        methods=tuple(args.methods.split(",")) if getattr(args, "methods", None) else METHODS,
        prep=task.prep_from_args(args),
        train=train,
        swa=PPGConfig(n_generators=args.n_generators, tau=args.tau, detach_p=not args.swa_p_grad,
                      p_per_layer=not args.swa_joint_p, hidden_dim=args.generator_hidden),
        width=args.width,
        small_input=args.small_input,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from duet_bus.evaluate import evaluate
    from duet_bus.report import table1

    config = _eval_config(args)
    # In a terminal the progress bars show the run; elsewhere (a log, CI) a line per seed as it finishes.
    doc = evaluate(config, show_progress=console.is_terminal, cache_dir=args.cache,
                   say=None if console.is_terminal else console.print)
    console.print(table1(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
        console.print(f"results written to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from duet_bus import checkpoint
    from duet_bus.train import progress_bar

    config = _eval_config(args)
    task = config.task
    prepared = task.prepare(config, args.seed)
    with progress_bar() as progress:
        model, summary, _ = task.train(config, prepared, args.method, args.seed, progress)
    version = checkpoint.save(args.out, model, prepared)
    best = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("valid_"))
    console.print(f"{args.method} on {config.dataset}/{config.backbone}: best {best} at epoch "
                  f"{summary['best_epoch']}; saved {args.out} (model version {version})")
    head = model.head
    if getattr(head, "config", None) is not None and head.config.n_generators > 1:
        import torch

        with torch.no_grad():
            mixes = [", ".join(f"{v:.3f}" for v in p.tolist()) for p in head.swa_p()]
        console.print("SWA mixing weights p per dynamic layer: " + "; ".join(f"[{m}]" for m in mixes))
    return 0


BOOTSTRAP_ENV = "DUET_BOOTSTRAP"


def _bootstrap(args: argparse.Namespace) -> str | None:
    import os

    return args.bootstrap or os.environ.get(BOOTSTRAP_ENV) or None


PASSWORD_ENV = "DUET_SASL_PASSWORD"


def _add_security_args(p: argparse.ArgumentParser) -> None:
    from duet_bus.bus import SASL_MECHANISMS, SECURITY_PROTOCOLS

    g = p.add_argument_group("secured clusters (each also from its DUET_* variable; the password only from "
                             f"${PASSWORD_ENV})")
    g.add_argument("--security-protocol", choices=SECURITY_PROTOCOLS, help="(or $DUET_SECURITY_PROTOCOL)")
    g.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS, help="(or $DUET_SASL_MECHANISM)")
    g.add_argument("--sasl-username", help="(or $DUET_SASL_USERNAME)")
    g.add_argument("--ssl-cafile", help="CA bundle for TLS (or $DUET_SSL_CAFILE; default: the system's)")


def _add_torch_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch's intra-op threads (default 1: faster here; see duet_bus/process.py)")


def _security(args: argparse.Namespace):
    import os

    from duet_bus.bus import Security

    env = os.environ.get
    return Security(
        protocol=args.security_protocol or env("DUET_SECURITY_PROTOCOL") or "PLAINTEXT",
        sasl_mechanism=args.sasl_mechanism or env("DUET_SASL_MECHANISM"),
        username=args.sasl_username or env("DUET_SASL_USERNAME"),
        password=env(PASSWORD_ENV),
        ssl_cafile=args.ssl_cafile or env("DUET_SSL_CAFILE"),
    )


def cmd_broker(args: argparse.Namespace) -> int:
    import time

    from duet_bus.broker import BrokerError, EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Kafka-compatible broker (Tansu) on {broker.bootstrap}; "
              f"use --bootstrap {broker.bootstrap} or export {BOOTSTRAP_ENV}={broker.bootstrap}. Ctrl-C stops it.",
              flush=True)
        while broker.alive():
            time.sleep(0.2)
        raise BrokerError(broker.exit_reason())


def _stop_on_signals(stop) -> None:
    """SIGTERM and SIGINT both set ``stop``: the command finishes its work in hand and exits 0."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, a job scheduler, `docker stop`) stops `duet run` as Ctrl-C does: the sessions done so
    far are reported, marked interrupted, and a sharded run asks its shards for theirs first.

    Only where Ctrl-C itself is taken: a process started with SIGINT ignored (a script's background job)
    keeps SIGTERM as it was, so that it still stops on it."""
    import os
    import signal

    if (signal.getsignal(signal.SIGINT) is signal.default_int_handler
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def cmd_cloud(args: argparse.Namespace) -> int:
    import asyncio

    from cloud import CloudConfig, GeneratorService
    from duet_bus import checkpoint, process
    from duet_bus.bus import KafkaBus

    bootstrap = _bootstrap(args)
    if not bootstrap:
        raise DuetError(f"duet cloud: give --bootstrap HOST:PORT (or {BOOTSTRAP_ENV}); `duet broker` starts one")
    security = _security(args)
    process.set_torch_threads(args.torch_threads)
    models = [checkpoint.load(path) for path in args.checkpoint]
    config = CloudConfig(group_id=args.group, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         weight_encoding=args.weight_encoding, reply_topics=tuple(args.reply_topics or ()))
    process.freeze_startup_heap()

    async def serve() -> None:
        import time

        started = time.monotonic()
        stop = asyncio.Event()
        _stop_on_signals(stop)
        bus = KafkaBus(bootstrap, security=security)
        await bus.start()
        service = GeneratorService(bus, models, config)
        try:
            # A stop signal while joining (the broker slow to answer) ends the command too.
            starting, stopping = asyncio.create_task(service.start()), asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not starting.done():
                starting.cancel()
                console.print("stopped before serving")
                return
            starting.result()
            console.print(f"cloud worker in group {config.group_id!r} serving "
                          f"{', '.join(m.model_version for m in models)} on {bootstrap} (replies only to "
                          f"{', '.join(config.allowed_reply_topics)}; what it serves is on {config.topics.models})")
            task = asyncio.create_task(service.run(stop))
            owned: set = set()
            next_line = time.monotonic() + 5
            while not task.done():
                await asyncio.wait({task}, timeout=0.1)
                now = service.consumer.assignment() if service.consumer else set()
                if now != owned:
                    owned = now
                    parts = ", ".join(str(p) for _, p in sorted(owned)) or "none"
                    console.print(f"partitions of {config.topics.sessions}: {parts} "
                                  f"({time.monotonic() - started:.1f} s after start)")
                if time.monotonic() >= next_line:
                    next_line += 5
                    console.print(_cloud_line(service.stats))
            await task  # re-raises what stopped it, if anything but the stop event
        finally:
            stop.set()
            await service.stop()  # leaves the group: the partitions move at once
            await bus.stop()  # flushes what is still being sent
        console.print(f"stopped: {_cloud_line(service.stats)}")

    asyncio.run(serve())
    return 0


def _cloud_line(s) -> str:
    return (f"served {s.served} sessions in {s.batches} batches, dead letters {s.dead_letters} "
            f"(internal errors {s.internal_errors}), lag {s.lag}")


def cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cloud import CloudConfig, GeneratorService
    from duet_bus import checkpoint

    ckpt = checkpoint.load(args.checkpoint)
    info = asdict(GeneratorService(None, [ckpt], CloudConfig(weight_encoding=args.weight_encoding)).model_info(ckpt))
    info.pop("at")
    info["factor_hidden"] = ckpt.spec.factor_hidden  # h: the factored form's H is (in, h)
    console.print_json(json.dumps(info))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np

    from devices import DeviceAgent, Fleet, FleetConfig
    from duet_bus import checkpoint, process
    from duet_bus.bus import KafkaBus
    from duet_bus.tasks import task_named

    bootstrap = _bootstrap(args)
    if not bootstrap:
        raise DuetError(f"duet devices: give --bootstrap HOST:PORT (or {BOOTSTRAP_ENV}); `duet broker` starts one")
    security = _security(args)
    process.set_torch_threads(args.torch_threads)
    ckpt = checkpoint.load(args.checkpoint)
    task = task_named(ckpt.task)
    sessions = task.test_sessions(ckpt, args.data_path, args.seed, args.count)
    process.freeze_startup_heap()

    async def run() -> tuple[list, object]:
        bus = KafkaBus(bootstrap, security=security)
        await bus.start()
        try:
            fleet = Fleet(bus, FleetConfig(fleet_id=args.fleet_id, reply_partition=args.reply_partition,
                                           deadline_s=args.deadline, upload=args.upload))
            await fleet.start()
            try:
                agents = [DeviceAgent(s.device_id, ckpt, fleet) for s in sessions]
                return await asyncio.gather(*(fleet.run(a, s) for a, s in zip(agents, sessions))), fleet.stats
            finally:
                await fleet.stop()
        finally:
            await bus.stop()

    reports, stats = asyncio.run(run())
    rtt = [r.delay_ms["round_trip_ms"] for r in reports if "round_trip_ms" in r.delay_ms]
    fallbacks = sum(r.fallback for r in reports)
    metrics = task.pooled_metrics([r.scores for r in reports], [r.labels for r in reports])
    shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    download = [r.payload_bytes["download"] for r in reports if "download" in r.payload_bytes]
    console.print(f"{len(reports)} sessions ({ckpt.model_version}): {shown}, fallbacks {fallbacks}"
                  + (f", round trip p50 {np.percentile(rtt, 50):.2f} ms p99 {np.percentile(rtt, 99):.2f} ms"
                     if rtt else "")
                  + (f", reply {np.median(download) / 1e3:.1f} kB" if download else "")
                  + f"; replies dropped: {stats.dropped_duplicates} duplicate or late, {stats.dropped_foreign} "
                    f"not ours, {stats.invalid_replies} invalid")
    return 0


def _add_plugin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", metavar="MODULE|FILE.py",
                   help="import this module (or Python file) first: one that registers shifts or backbones, "
                        "e.g. examples/meanpool.py (repeatable)")


def _load_plugins(plugins: list[str] | None) -> None:
    """Import each ``--plugin``: a module name, or the path of a Python file (imported as a module named after
    the file)."""
    import importlib
    import importlib.util

    for plugin in plugins or []:
        path = Path(plugin)
        if plugin.endswith(".py") and not path.is_file():
            raise DuetError(f"--plugin {plugin}: no such file")
        try:
            if plugin.endswith(".py"):
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module  # as an imported module is: its classes' pickles find it
                spec.loader.exec_module(module)
            else:
                importlib.import_module(plugin)
        except Exception as exc:  # the plugin's own error (a missing import, a syntax error): named, not a traceback
            if plugin.endswith(".py"):
                sys.modules.pop(path.stem, None)
            raise DuetError(f"--plugin {plugin}: cannot import it ({type(exc).__name__}: {exc})") from exc


def cmd_validate(args: argparse.Namespace) -> int:
    from duet_bus.scenario import load_scenario

    failed = 0
    for path in args.files:
        try:
            scenario = load_scenario(path)
        except DuetError as exc:
            failed += 1
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        else:
            console.print(f"{path}: ok ({scenario.name}: {scenario.device_count} devices, "
                          f"{', '.join(scenario.methods)}, {len(scenario.shifts)} shift(s))")
    return 2 if failed else 0


_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from duet_bus.report import run_table
    from duet_bus.runner import load_checkpoints, prepare_data, run_scenario
    from duet_bus.scenario import load_scenario
    from duet_bus.train import progress_bar

    if args.shard:
        from duet_bus.shards import take_parents_stop

        take_parents_stop()
    _sigterm_as_ctrl_c()
    scenario = load_scenario(args.file, args.set)
    if args.output:
        scenario = replace(scenario, output=args.output)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError(f"--seeds: must be a positive number of seeds, got {args.seeds}")
        if args.seeds > 1 and scenario.checkpoints:
            raise ConfigError("--seeds: the scenario names model.checkpoints; each seed trains its own models")
        scenario = replace(scenario, seeds=tuple(range(scenario.seed, scenario.seed + args.seeds)))
    for flag, value in (("--shards", args.shards), ("--collect", args.collect)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be a positive number, got {value}")
    several = [flag for flag, on in (("--seeds", len(scenario.seeds) > 1), ("--shards", (args.shards or 1) > 1),
                                     ("--shard", bool(args.shard)), ("--collect", bool(args.collect))) if on]
    if len(several) > 1:
        raise ConfigError(f"{' and '.join(several)}: one at a time")
    if args.shard_out and not args.shard:
        raise ConfigError("--shard-out: only with --shard (`duet run --shards N` gives it to its shards)")
    if args.run_id is not None and not _RUN_ID.fullmatch(args.run_id):
        raise ConfigError(f"--run-id: 1 to 64 letters, digits, - or _ (it names a folder and the run's records), "
                          f"got {args.run_id!r}")
    if args.collect:
        return _collect(scenario, args)
    if len(scenario.seeds) > 1:
        return _run_seeds(scenario)
    if scenario.seeds[0] != scenario.seed:
        scenario = replace(scenario, seed=scenario.seeds[0])
    if args.shard or (args.shards or 1) > 1:
        return _run_shards(scenario, args)
    live = scenario.dashboard and not args.no_dashboard and console.is_terminal
    console.print(f"scenario {scenario.name} ({args.file}): preparing data and checkpoints")
    prepared = prepare_data(scenario)
    with progress_bar() as progress:
        checkpoints = load_checkpoints(scenario, prepared, progress)
    if live:
        from duet_bus.dashboard import Dashboard

        with Dashboard(console) as dashboard:
            doc, out = run_scenario(scenario, prepared, checkpoints, on_step=dashboard.update)
    else:
        doc, out = run_scenario(scenario, prepared, checkpoints, on_step=_Ticker(scenario.duration_s))
    console.print(run_table(doc))
    console.print(f"report: {out}/results.json, {out}/sessions.csv, plots: "
                  f"{', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return 130 if doc["run"]["interrupted"] else 0


def _run_shards(scenario, args: argparse.Namespace) -> int:
    """`duet run --shards N` (the devices over N processes of this host) or `--shard k/N` (one of them)."""
    from duet_bus.report import run_table
    from duet_bus.runner import load_checkpoints, prepare_data
    from duet_bus.shards import parse_shard, run_memory_shard, run_shard, run_sharded
    from duet_bus.train import progress_bar

    shard = parse_shard(args.shard, args.run_id) if args.shard else None
    prepared = prepare_data(scenario)
    with progress_bar() as progress:
        checkpoints = load_checkpoints(scenario, prepared, progress)
    if shard is not None:
        ticker = _Ticker(scenario.duration_s)
        if args.shard_out:
            state = run_memory_shard(scenario, prepared, checkpoints, shard, Path(args.shard_out), on_step=ticker)
        else:
            state = run_shard(scenario, prepared, checkpoints, shard, on_step=ticker)
        console.print(f"shard {shard.index}/{shard.count} of run {shard.run_id}: {state.sessions} sessions in "
                      f"{state.wall_s:.1f} s, records " + (f"in {args.shard_out}" if args.shard_out
                                                           else "published on the reports topic"))
        return 130 if state.interrupted else 0
    child = ["run", args.file, *(a for item in args.set or () for a in ("--set", item)),
             *(a for module in args.plugin or () for a in ("--plugin", module))]  # the shards read the same file
    if args.output:
        child += ["--output", args.output]
    console.print(f"scenario {scenario.name}: {args.shards} shards of {scenario.device_count} devices")
    doc, out = run_sharded(scenario, checkpoints, args.shards, child, echo=console.print)
    console.print(run_table(doc))
    console.print(f"report: {out}/results.json, {out}/sessions.csv, plots: "
                  f"{', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return 130 if doc["run"]["interrupted"] else 0


def _collect(scenario, args: argparse.Namespace) -> int:
    """`duet run --collect N --run-id R`: the report of a run whose N shards ran elsewhere (or, on the in-process
    bus, whose parent was killed)."""
    from duet_bus.report import run_table
    from duet_bus.shards import collect_run, records_folder

    if not args.run_id:
        raise ConfigError("--collect: needs --run-id, the one its shards were given")
    source = records_folder(scenario, args.run_id) if scenario.bus_kind == "memory" else scenario.bootstrap
    console.print(f"collecting run {args.run_id} ({args.collect} shards) from {source}")
    doc, out = collect_run(scenario, args.collect, args.run_id)
    console.print(run_table(doc))
    console.print(f"report: {out}/results.json, {out}/sessions.csv")
    return 0


def _run_seeds(scenario) -> int:
    """`duet run` over several seeds: progress lines (no live dashboard), one table over seeds."""
    from duet_bus.report import seeds_table
    from duet_bus.runner import run_seeds
    from duet_bus.train import progress_bar

    def seed_line(seed: int) -> None:
        console.print(f"seed {seed} ({scenario.seeds.index(seed) + 1} of {len(scenario.seeds)}): "
                      "preparing data and checkpoints")

    doc, out = run_seeds(scenario, on_step=_Ticker(scenario.duration_s), training=progress_bar, on_seed=seed_line)
    console.print(seeds_table(doc))
    console.print(f"report: {out}/results.json (over seeds); each seed's report, sessions and plots in "
                  f"{out}/seed-K/")
    return 130 if any(r["interrupted"] for r in doc["runs"].values()) else 0


class _Ticker:
    """Without a terminal: a line at every tenth of the virtual duration."""

    def __init__(self, duration: float) -> None:
        self.duration, self.next = duration, 0.0

    def __call__(self, state) -> None:
        if state.now_s >= self.next or state.finished:
            self.next = state.now_s + self.duration / 10
            console.print(f"  virtual {state.now_s / 3600:6.2f} h  wall {state.wall_s:6.1f} s  "
                          f"sessions {state.sessions}  fallbacks {state.fallbacks}")


def cmd_report(args: argparse.Namespace) -> int:
    from duet_bus.report import (is_seeds_folder, plot_training, rerender, rerender_seeds, run_table, seeds_table,
                                 swa_sweep, table1, table4)

    out = Path(args.run_dir)
    if out.is_file():  # a `duet evaluate --out` document
        try:
            doc = json.loads(out.read_text())
            doc["methods"], doc["seeds"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DuetError(f"{out}: not a results document of `duet evaluate` ({exc})") from exc
        console.print(table1(doc))
        if len(swa_sweep(doc)) > 1:
            console.print(table4(doc))
        if doc.get("curves"):
            console.print(f"training curves: {plot_training(out.with_suffix('.png'), doc)}")
        return 0
    if is_seeds_folder(out):
        doc = rerender_seeds(out)
        console.print(seeds_table(doc))
        console.print(f"re-rendered {out}/results.json from {', '.join(f'seed-{k}' for k in doc['seeds'])}")
        return 0
    doc = rerender(out)
    console.print(run_table(doc))
    console.print(f"re-rendered {out}/results.json and plots: {', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from duet_bus.compare import compare_runs, compare_table

    doc = compare_runs(Path(args.a), Path(args.b))
    console.print(compare_table(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
        console.print(f"comparison: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from duet_bus.protocol import REPLY_ENCODINGS, UPLOADS

    parser = argparse.ArgumentParser(prog="duet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario: devices, shifts, the cloud over Kafka; a live dashboard; a report")
    p.add_argument("file", help="scenario YAML (see scenarios/)")
    p.add_argument("--output", help="output folder (default: the scenario's `output`)")
    p.add_argument("--no-dashboard", action="store_true", help="progress lines instead of the live dashboard")
    p.add_argument("--seeds", type=int, help="repeat the run with this many seeds, from the scenario's seed "
                                             "(training included, cached); report mean ± std over seeds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting of the file, e.g. --set model.backbone=din (repeatable)")
    p.add_argument("--shards", type=int, help="split the devices over this many runner processes of this host, "
                                              "reported as one run (over Kafka served by one cloud; on the "
                                              "in-process bus each with its own)")
    p.add_argument("--shard", metavar="K/N", help="run shard K of N against the cluster in bus.bootstrap "
                                                  "(one per host; the cloud: `duet cloud` workers)")
    p.add_argument("--run-id", help="with --shard and --collect: the run's id, the same for all its shards")
    p.add_argument("--shard-out", metavar="FILE", help="with --shard on the in-process bus: run the shard with "
                                                       "its own cloud and write its records to FILE (what "
                                                       "--shards N does for each shard)")
    p.add_argument("--collect", type=int, metavar="N", help="write the report of run --run-id from its N "
                                                            "shards' records on the cluster's reports topic (on "
                                                            "the in-process bus: those its shards left in the "
                                                            "output folder when their parent was killed)")
    _add_plugin(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check scenario files and report every problem")
    p.add_argument("files", nargs="+")
    _add_plugin(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("report", help="re-render the table and plots of a run folder, or the tables and training "
                                      "curves of a `duet evaluate --out` document")
    p.add_argument("run_dir", help="a run folder, or a results JSON of `duet evaluate`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="two runs of one scenario, session by session: what a setting changed "
                                       "(accuracy paired per session, delays side by side)")
    p.add_argument("a", help="a run folder (`duet run`'s output)")
    p.add_argument("b", help="another run folder of the same scenario and seed, one setting changed")
    p.add_argument("--out", help="write the comparison (JSON) here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="compare base, finetune, duet_no_swa and duet offline (Tables 1, 2, 4)")
    _add_data_args(p)
    p.add_argument("--seeds", type=int, default=5, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--methods", help="comma-separated: base, finetune, duet_no_swa, duet (default: these four), "
                                     "duet_npK for N_p = K (the SWA sweep)")
    p.add_argument("--out", help="write the results document (JSON) here")
    p.add_argument("--cache", help="keep each seed's results in this folder as it finishes; seeds found there "
                                   "are read, not run again (resume a stopped run, add seeds)")
    _add_plugin(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train one model and save a checkpoint for the cloud service")
    _add_data_args(p)
    p.add_argument("--method", default="duet", help="base, duet_no_swa, duet or duet_npK")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    _add_plugin(p)
    p.set_defaults(func=cmd_train, seeds=1)

    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker in the foreground")
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("cloud", help="run a generator worker (consumer group member)")
    p.add_argument("--bootstrap", help=f"Kafka bootstrap servers (or ${BOOTSTRAP_ENV})")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint to serve (repeatable)")
    p.add_argument("--group", default="duet-cloud")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a batch may wait to fill after its first event (default 0: take what has arrived)")
    p.add_argument("--weight-encoding", default="float32", choices=list(REPLY_ENCODINGS),
                   help="factored (factored_float16): the generator's per-session factor H in float32 (float16), "
                        "the device holds W2 and b2")
    p.add_argument("--reply-topic", action="append", dest="reply_topics",
                   help="a topic requests may name as reply_topic (repeatable; default: duet.weights only)")
    _add_torch_threads(p)
    _add_security_args(p)
    _add_plugin(p)
    p.set_defaults(func=cmd_cloud)

    p = sub.add_parser("info", help="what a checkpoint serves: model version, item ids, L, layer shapes (as JSON)")
    p.add_argument("checkpoint")
    p.add_argument("--weight-encoding", default="float32", choices=list(REPLY_ENCODINGS))
    _add_plugin(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("devices", help="run a fleet of devices through their test sessions against a cloud")
    p.add_argument("--bootstrap", help=f"Kafka bootstrap servers (or ${BOOTSTRAP_ENV})")
    p.add_argument("--checkpoint", required=True, help="the checkpoint whose static layers the devices hold")
    p.add_argument("--data-path", help="dataset file or folder, if the checkpoint's dataset is not bundled")
    p.add_argument("--upload", default="samples", choices=list(UPLOADS),
                   help="real-time samples as they are, images as 8-bit pixels, or (image models) their "
                        "static-layer features")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fleet-id", default="fleet-0")
    p.add_argument("--reply-partition", type=int, default=0)
    p.add_argument("--deadline", type=float, default=2.0, help="seconds to wait for weights before falling back")
    _add_torch_threads(p)
    _add_security_args(p)
    _add_plugin(p)
    p.set_defaults(func=cmd_devices)
    return parser


def _setup_logging() -> None:
    """Our loggers (duet.*) say what went wrong with a record or the bus, one line each.

    aiokafka logs every failed connection attempt while a broker is away;
    those lines repeat what our own say, so only its critical ones show
    (``DUET_KAFKA_LOG=warning`` shows them all).
    """
    import logging
    import os

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(os.environ.get("DUET_KAFKA_LOG", "critical").upper())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        _load_plugins(getattr(args, "plugin", None))
        return args.func(args)
    except DuetError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

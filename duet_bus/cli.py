"""`duet ...`: the command line.

Every user mistake surfaces as a `DuetError` and is printed as one line,
without a traceback; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from duet_bus.errors import DuetError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--data-path", help="GroupLens u.data / ratings.dat (or its folder); ML-100k is bundled")
    p.add_argument("--backbone", default="sasrec", choices=["din", "sasrec", "gru4rec"])
    p.add_argument("--epochs", type=int, default=30, help="at most; early stopping on validation AUC")
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256, help="groups (1 positive + 4 negatives) per step")
    p.add_argument("--gamma", type=float, default=1.0, help="session weighting gamma^t (1 = uniform)")
    p.add_argument("--history-len", type=int, default=10, help="L: history and real-time samples per session")
    p.add_argument("--eval-negatives", type=int, default=100, help="sampled negatives per test target")
    p.add_argument("--np", dest="n_generators", type=int, default=5, help="SWA generators N_p for `duet`")
    p.add_argument("--tau", type=float, default=0.1, help="SWA temperature")


def _eval_config(args: argparse.Namespace):
    from duet_bus.data.prep import PrepConfig
    from duet_bus.evaluate import METHODS, EvalConfig
    from duet_bus.models import PPGConfig
    from duet_bus.train import TrainConfig

    if args.seeds < 1:
        raise DuetError(f"--seeds: must be a positive integer, got {args.seeds}")
    base = EvalConfig()
    return replace(
        base,
        dataset=args.dataset,
        data_path=args.data_path,
        backbone=args.backbone,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        methods=tuple(args.methods.split(",")) if getattr(args, "methods", None) else METHODS,
        prep=PrepConfig(history_len=args.history_len, eval_negatives=args.eval_negatives),
        train=TrainConfig(epochs=args.epochs, patience=args.patience, gamma=args.gamma, batch_size=args.batch_size),
        swa=PPGConfig(n_generators=args.n_generators, tau=args.tau),
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from duet_bus.evaluate import evaluate
    from duet_bus.report import table1

    config = _eval_config(args)
    doc = evaluate(config, show_progress=console.is_terminal)
    console.print(table1(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
        console.print(f"results written to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from duet_bus import checkpoint
    from duet_bus.data import load_dataset, prepare
    from duet_bus.train import train_model

    config = _eval_config(args)
    data = load_dataset(config.dataset, config.data_path)
    prepared = prepare(data, config.prep, seed=args.seed)
    result = train_model(prepared, config.model_config(args.method), config.train, args.seed, label=args.method)
    version = checkpoint.save(args.out, result.model, prepared)
    console.print(
        f"{args.method} on {config.dataset}/{config.backbone}: best validation AUC "
        f"{result.best_valid_auc:.4f} at epoch {result.best_epoch}; saved {args.out} (model version {version})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="compare base, finetune, duet_no_swa and duet offline (Table 1)")
    _add_data_args(p)
    p.add_argument("--seeds", type=int, default=5, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--methods", help="comma-separated subset of base,finetune,duet_no_swa,duet")
    p.add_argument("--out", help="write the results document (JSON) here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train one model and save a checkpoint for the cloud service")
    _add_data_args(p)
    p.add_argument("--method", default="duet", choices=["base", "duet_no_swa", "duet"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.set_defaults(func=cmd_train, seeds=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DuetError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

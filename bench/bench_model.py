"""Model-side cost on this machine: generation vs the base forward, fine-tuning, training.

Prints, per backbone, on real ML-100k shapes (untrained weights: cost does not
depend on their values):

- DUET generation latency for 1 and 1024 sessions (PPG + SWA, N_p = 5), as a
  ratio against the base model's forward over the same sessions (each session
  scores 1 positive + 100 negatives, as on the device);
- per-device fine-tuning time (k = 10 Adam steps on 10 labelled samples) as a
  ratio against one DUET generation;
- training time per epoch, DUET (N_p = 5) against base, from timed steps of the training itself
  (`train.train_step` on `train.session_batches`, the default batch size; base and DUET steps
  alternate on the same batches, medians of 45 each); and, for comparison, DUET
  on random batches of the same size scored sample by sample (each sample encodes its real-time
  clicks and generates its layers), against the same base epoch;
- for DIN, whose generator is the largest, the DUET epoch against base for generators of hidden size
  h = 32 (the default) and 16, with N_p = 5 and 1 (`--generator-hidden`, `model.swa.hidden`).

Medians of repeated runs; absolute times are for this machine only, the
ratios are what to compare.  Run: `make bench` (or python bench/bench_model.py).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from duet_bus.data import load_dataset, prepare
from duet_bus.tasks.recommendation import finetune_scores
from duet_bus.finetune import FinetuneConfig
from duet_bus.models import BACKBONES, ModelConfig, PPGConfig, build_model
from duet_bus.train import TrainConfig, optimizer_for, session_batches, tensors, train_step, weighted_bce


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def epoch_seconds(models: list, prepared, train, config: TrainConfig, rng) -> list[float]:
    """Each model's training epoch in seconds, from the median of its timed steps. The models' steps
    alternate on the same batches, so machine noise falls on all alike."""
    opts = [optimizer_for(model.train(), config) for model in models]
    step_ms: list[list[float]] = [[] for _ in models]
    for n, index in enumerate(session_batches(prepared, config.batch_size, rng)[:50]):
        batch = train.take(index)
        for k, model in enumerate(models):
            start = time.perf_counter()
            train_step(model, opts[k], batch)
            if n >= 5:  # warm-up
                step_ms[k].append((time.perf_counter() - start) * 1000)
    steps_per_epoch = len(session_batches(prepared, config.batch_size, rng))
    return [statistics.median(ms) * steps_per_epoch / 1000 for ms in step_ms]


def generator_sizes(prepared, train, config: TrainConfig, rng) -> Table:
    """DIN's DUET epoch against base for generators of hidden size h = 32 (the default) and 16, N_p = 5 and 1:
    DIN's generated layers are the widest (64 -> 128 -> 64 -> 1), so its generator is the largest."""
    table = Table(title="DIN: the generator's size against the training epoch (each against base, alternating)")
    for col in ("N_p", "generator hidden h", "parameters", "epoch base (s)", "epoch DUET (s)", "ratio"):
        table.add_column(col, justify="right")
    for n_p in (5, 1):
        for hidden in (32, 16):
            base = build_model(ModelConfig(backbone="din"), prepared.n_items, 10)
            duet = build_model(ModelConfig(backbone="din", ppg=PPGConfig(n_generators=n_p, hidden_dim=hidden)),
                               prepared.n_items, 10)
            epoch = epoch_seconds([base, duet], prepared, train, config, rng)
            table.add_row(str(n_p), str(hidden), f"{sum(p.numel() for p in duet.parameters()):,}", f"{epoch[0]:.1f}",
                          f"{epoch[1]:.1f}", f"{epoch[1] / epoch[0]:.2f}x")
    return table


def main() -> None:
    torch.manual_seed(0)
    prepared = prepare(load_dataset("ml-100k"), seed=0)
    sessions = prepared.eval_samples("test")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(sessions), 1024, replace=True)
    big = tensors(sessions.take(idx))
    one = tensors(sessions.take(idx[:1]))
    train = prepared.train_samples(rng, 1.0)
    config = TrainConfig()  # the training's own batches (whole sessions) and optimizer
    steps_per_epoch = len(session_batches(prepared, config.batch_size, rng))

    table = Table(title=f"Model cost on this machine (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for col in ("backbone", "gen 1 (ms)", "base fwd 1 (ms)", "ratio", "gen 1024 (ms)", "base fwd 1024 (ms)",
                "ratio", "finetune/device (ms)", "finetune / gen 1", "epoch base (s)", "epoch DUET (s)", "ratio",
                "ratio, DUET sample by sample"):
        table.add_column(col, justify="right")
    for name in BACKBONES:
        base = build_model(ModelConfig(backbone=name), prepared.n_items, 10).eval()
        duet = build_model(ModelConfig(backbone=name, ppg=PPGConfig(n_generators=5)), prepared.n_items, 10).eval()
        row = [name]
        for x, repeat in ((one, 200), (big, 10)):
            with torch.inference_mode():
                gen = median_ms(lambda: duet.weights_for(x["realtime"], x["realtime_len"]), repeat)
                weights = base.head.layer_weights()
                fwd = median_ms(lambda: base.score(x["history"], x["history_len"], x["targets"], weights), repeat)
            row += [f"{gen:.3f}", f"{fwd:.3f}", f"{gen / fwd:.2f}x"]
        gen_one = float(row[1])
        _, ft_ms = finetune_scores(base, prepared, FinetuneConfig(), seed=0)
        ft = float(np.median(ft_ms))
        row += [f"{ft:.2f}", f"{ft / gen_one:.0f}x"]
        epoch = epoch_seconds([base, duet], prepared, train, config, rng)
        # What the session layout buys: the same DUET step on random batches, sample by sample.
        opt = optimizer_for(duet, config)

        def per_sample() -> None:
            b = train.take(rng.choice(len(train), config.batch_size, replace=False))
            loss = weighted_bce(duet(**tensors(b)), torch.from_numpy(b.labels), torch.from_numpy(b.weight))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        epoch.append(median_ms(per_sample, 40) * steps_per_epoch / 1000)
        row += [f"{epoch[0]:.1f}", f"{epoch[1]:.1f}", f"{epoch[1] / epoch[0]:.2f}x", f"{epoch[2] / epoch[0]:.2f}x"]
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    console.print(generator_sizes(prepared, train, config, rng))


if __name__ == "__main__":
    main()

"""How a long-running process (`duet cloud`, `duet devices`) sets itself up for steady latency.

Two costs measured on the bus (`make bench-bus`, docs/performance.md) come from the process, not from
its work:

- torch's threads. The cloud's generation and a device's scoring run on the event loop's executor
  threads (`asyncio.to_thread`), and every thread that runs a parallel torch operation gets an OpenMP team
  of its own. Past one OpenMP thread per core, idle threads stop spinning and every small operation pays
  for waking them: a batched generation of 100 GRU4Rec sessions took 2.8-4.7 ms on two threads, 1.6-2.9
  ms on one.
- Python's full garbage collections. Such a process holds about 180,000 objects once started (torch's
  modules, the checkpoint, the devices' sessions), none of them ever garbage, and a full collection walks
  them all: 55 ms quiet, about 100 ms beside the broker, for every session in flight at the time (the
  p99 round trip at 100 in flight was 120-200 ms against a p50 of 25-45; 38-60 ms once frozen).
"""

from __future__ import annotations

import gc

import torch

from duet_bus.errors import ConfigError


def set_torch_threads(n: int) -> None:
    """torch's intra-op threads for the whole process; set before any torch work."""
    if n < 1:
        raise ConfigError(f"--torch-threads: must be a positive integer, got {n}")
    torch.set_num_threads(n)


def freeze_startup_heap() -> None:
    """Keep what the process made while starting out of the garbage collector's sight (`gc.freeze`).

    Call it once everything long-lived is loaded: later full collections then walk only what was made
    after (a few ms), not every object of the start-up (55-100 ms). Objects made before that later become
    garbage in a reference cycle are not freed; a process that starts once and serves holds few such.
    """
    gc.collect()
    gc.freeze()

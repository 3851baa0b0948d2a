"""The generator service.

One loop per worker: take up to ``max_batch`` session-start events or whatever
arrived within ``max_wait_ms`` of the first one, validate each, run one batched
PPG/SWA forward per model version under ``torch.inference_mode()``, publish each
``WeightsReady`` to the partition the request named, wait for the broker's
acknowledgements, and only then commit the consumed offsets (at-least-once:
a crash before the commit re-serves the batch; devices drop the duplicates).

Whatever fails validation goes to the dead-letter topic with the reason; the
loop goes on. Workers share the sessions topic as one consumer group, so a
second worker takes over half of the partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from duet_bus import protocol
from duet_bus.bus import Record, Topics
from duet_bus.checkpoint import Checkpoint
from duet_bus.errors import ConfigError
from duet_bus.protocol import DeadLetter, ProtocolError, SessionStart, WeightsReady

log = logging.getLogger("duet.cloud")


@dataclass(frozen=True)
class CloudConfig:
    group_id: str = "duet-cloud"
    max_batch: int = 256  # B: sessions per generator forward at most
    # T: how long a batch may wait to fill after its first event. 0 takes what
    # has arrived: under load batches still form (requests queue while the
    # previous batch is generated) and a lone session waits for nothing.
    # Measured (make bench-bus, --max-wait-ms 0/2/5): session p50 at 1 in
    # flight 1.47x / 1.68x / 2.28x the raw echo, same sessions/s.
    max_wait_ms: float = 0.0
    weight_encoding: str = "float32"  # float32, float16 or int8 on the wire
    topics: Topics = field(default_factory=Topics)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"cloud.max_batch: must be a positive integer, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"cloud.max_wait_ms: must be non-negative, got {self.max_wait_ms}")
        if self.weight_encoding not in ("float32", "float16", "int8"):
            raise ConfigError(f"cloud.weight_encoding: must be float32, float16 or int8, got {self.weight_encoding!r}")


@dataclass
class CloudStats:
    served: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))
    generation_ms: deque = field(default_factory=lambda: deque(maxlen=1000))
    lag: int = 0


class GeneratorService:
    """Serve one or more checkpoints (keyed by model version) on a bus."""

    def __init__(self, bus, checkpoints: list[Checkpoint], config: CloudConfig | None = None) -> None:
        self.bus = bus
        self.config = config or CloudConfig()
        self.models = {c.model_version: c for c in checkpoints}
        self.stats = CloudStats()
        self.consumer = None

    async def start(self) -> None:
        await self.bus.ensure_topics(self.config.topics.all())
        self.consumer = self.bus.group_consumer([self.config.topics.sessions], self.config.group_id)
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; start() first."""
        while not stop.is_set():
            records, received_at = await self.next_batch()
            if records:
                await self.handle(records, received_at)
                self.stats.lag = await self.consumer.lag()

    async def next_batch(self) -> tuple[list[Record], float]:
        """The next micro-batch (possibly empty) and when its first record was taken.

        That time goes into the replies' ``received_at``: the batch wait counts as cloud time.
        """
        cfg = self.config
        records = await self.consumer.getmany(timeout_ms=100, max_records=cfg.max_batch)
        received_at = time.time()
        if not records:
            return records, received_at
        deadline = time.perf_counter() + cfg.max_wait_ms / 1000
        while len(records) < cfg.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            more = await self.consumer.getmany(timeout_ms=max(1, int(left * 1000)),
                                               max_records=cfg.max_batch - len(records))
            records.extend(more)
        return records, received_at

    async def handle(self, records: list[Record], received_at: float | None = None) -> None:
        """Validate, generate, publish, then commit. Never raises for bad input.

        ``received_at`` is when the batch's first record was taken (default:
        now); replies carry it, so a device sees the batch wait as cloud time.
        """
        received_at = time.time() if received_at is None else received_at
        by_model: dict[str, list[SessionStart]] = {}
        outgoing: list[tuple[str, bytes, bytes | None, int | None]] = []
        for record in records:
            try:
                event = protocol.decode(record.value)
                if not isinstance(event, SessionStart):
                    raise ProtocolError("type", f"{event.TYPE} does not belong on {record.topic}")
                checkpoint = self.models.get(event.model_version)
                if checkpoint is None:
                    raise ProtocolError("model_version", f"{event.model_version!r} is not served here "
                                                         f"(serving {', '.join(self.models) or 'nothing'})")
                protocol.check_session_start(event, checkpoint.spec)
                by_model.setdefault(event.model_version, []).append(event)
            except ProtocolError as exc:
                outgoing.append(self._dead_letter(record, str(exc)))
        for version, events in by_model.items():
            outgoing.extend(await self._generate(self.models[version], events, received_at))
        await self.bus.send_many(outgoing)
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            offsets[key] = max(offsets.get(key, 0), record.offset + 1)
        await self.consumer.commit(offsets)

    @staticmethod
    def _forward(checkpoint: Checkpoint, realtime: np.ndarray, lengths: np.ndarray):
        start = time.perf_counter()
        with torch.inference_mode():
            weights = checkpoint.model.weights_for(torch.from_numpy(realtime), torch.from_numpy(lengths))
            layers = [(w.numpy(), b.numpy()) for w, b in weights]
        return layers, (time.perf_counter() - start) * 1000

    async def _generate(self, checkpoint: Checkpoint, events: list[SessionStart], received_at: float):
        length = checkpoint.prep.history_len
        realtime = np.zeros((len(events), length), np.int64)
        lengths = np.empty(len(events), np.int64)
        for i, event in enumerate(events):
            items = event.realtime[-length:]
            realtime[i, : len(items)] = items
            lengths[i] = len(items)
        # In a thread (torch releases the GIL): the consumer keeps fetching the
        # next batch while this one is generated.
        layers, generation_ms = await asyncio.to_thread(self._forward, checkpoint, realtime, lengths)
        self.stats.batches += 1
        self.stats.served += len(events)
        self.stats.batch_sizes.append(len(events))
        self.stats.generation_ms.append(generation_ms)
        method = checkpoint.model.config.method
        replies = []
        for i, event in enumerate(events):
            reply = WeightsReady(
                session_id=event.session_id, device_id=event.device_id, model_version=event.model_version,
                method=method, layers=[(w[i], b[i]) for w, b in layers], received_at=received_at,
                sent_at=time.time(), generation_ms=generation_ms, batch_size=len(events),
            )
            replies.append((event.reply_topic, protocol.encode(reply, self.config.weight_encoding),
                            event.device_id.encode(), event.reply_partition))
        return replies

    def _dead_letter(self, record: Record, reason: str):
        self.stats.dead_letters += 1
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter(reason=reason, topic=record.topic, partition=record.partition, offset=record.offset,
                            original=bytes(record.value), at=time.time())
        return (self.config.topics.deadletter, protocol.encode(letter), record.key, None)

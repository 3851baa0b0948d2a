"""The generator service.

One loop per worker: take up to ``max_batch`` session-start events or whatever
arrived within ``max_wait_ms`` of the first one, validate each, run one batched
PPG/SWA forward per model version under ``torch.inference_mode()``, publish each
``WeightsReady`` to the partition the request named, wait for the broker's
acknowledgements, and only then commit the consumed offsets (at-least-once:
a crash before the commit re-serves the batch; devices drop the duplicates).

No record can stop the worker. Whatever fails validation goes to the
dead-letter topic with the reason; whatever raises anything else while it is
handled (a bug of ours) is dead-lettered as an internal error, logged with its
traceback and counted, and the rest of the batch is served. Because a record
always ends answered or dead-lettered before its offset is committed, a bad
record is never re-read forever.

The cloud writes only where it is configured to: replies go to the allowed
reply topics (default: the weights topic) and to partitions that exist;
a request that names anything else is dead-lettered. Workers share the
sessions topic as one consumer group, so a second worker takes over half of
the partitions, and when it starts each worker announces what it serves on
the models topic (`ModelInfo`).
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
from duet_bus.bus import Record, Topics, is_transient
from duet_bus.checkpoint import Checkpoint
from duet_bus.errors import ConfigError
from duet_bus.models.dynamic import layer_bytes
from duet_bus.protocol import DeadLetter, ProtocolError, SessionStart, WeightsReady

log = logging.getLogger("duet.cloud")

Message = tuple[str, bytes, bytes | None, int | None]  # topic, value, key, partition


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
    # float32, float16 or int8: the full (W, b) per layer; factored (factored_float16): the generator's
    # per-session factor H and the bias in float32 (float16), the device holds the shared W2, b2 (see
    # `models.dynamic.Factored`).
    weight_encoding: str = "float32"
    topics: Topics = field(default_factory=Topics)
    # The only topics a request may name as its reply topic; empty: the weights topic.
    reply_topics: tuple[str, ...] = ()
    # While the broker is unreachable a batch is sent again every retry_backoff_s;
    # after delivery_timeout_s the worker stops trying and reads the batch again.
    retry_backoff_s: float = 0.5
    delivery_timeout_s: float = 60.0
    commit_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"cloud.max_batch: must be a positive integer, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"cloud.max_wait_ms: must be non-negative, got {self.max_wait_ms}")
        if self.weight_encoding not in protocol.REPLY_ENCODINGS:
            raise ConfigError(f"cloud.weight_encoding: must be one of {', '.join(protocol.REPLY_ENCODINGS)}, got "
                              f"{self.weight_encoding!r}")

    @property
    def factored(self) -> bool:
        """Replies carry each layer's factor ``H`` instead of the full weights."""
        return protocol.REPLY_ENCODINGS[self.weight_encoding][0] == "factored"

    @property
    def array_encoding(self) -> str:
        """How each array of a reply is encoded (`tensors.WEIGHT_ENCODINGS`)."""
        return protocol.REPLY_ENCODINGS[self.weight_encoding][1]

    @property
    def allowed_reply_topics(self) -> tuple[str, ...]:
        return self.reply_topics or (self.topics.weights,)


@dataclass
class CloudStats:
    served: int = 0
    dead_letters: int = 0
    internal_errors: int = 0  # records that hit a bug of ours (also counted in dead_letters)
    delivery_retries: int = 0  # batches sent again because the broker was unreachable
    commit_failures: int = 0  # the records stay uncommitted and are served again (at-least-once)
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
        for c in checkpoints:
            spec = c.spec
            itemsize = np.dtype(self.config.array_encoding).itemsize
            size = layer_bytes(spec.layer_shapes, itemsize, spec.factor_hidden if self.config.factored else 0)
            if size > protocol.MAX_MESSAGE_BYTES:
                raise ConfigError(f"cloud.weight_encoding: a {c.model_version} reply in {self.config.weight_encoding} "
                                  f"is {size / 1e6:.2f} MB, over the {protocol.MAX_MESSAGE_BYTES / 2**20:.0f} MiB "
                                  f"message limit; use float16, int8 or factored")
        self.stats = CloudStats()
        self.consumer = None
        self._partitions: dict[str, int] = {}  # reply topic -> partition count
        self._partitions_checked = 0.0

    async def start(self) -> None:
        await self.bus.ensure_topics({**self.config.topics.all(), **{t: 1 for t in self.config.reply_topics}})
        await self._refresh_partitions()
        await self.bus.send_many([(self.config.topics.models, protocol.encode(self.model_info(c)),
                                   c.model_version.encode(), None) for c in self.models.values()])
        self.consumer = self.bus.group_consumer([self.config.topics.sessions], self.config.group_id)
        await self.consumer.start()

    async def stop(self) -> None:
        """Leave the consumer group (its partitions move to the other workers at once)."""
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    def model_info(self, checkpoint: Checkpoint) -> protocol.ModelInfo:
        spec = checkpoint.spec
        return protocol.ModelInfo(
            model_version=spec.model_version, method=checkpoint.model.config.method,
            backbone=checkpoint.model.config.name, n_items=spec.n_items, realtime_len=spec.realtime_len,
            layer_shapes=[list(s) for s in spec.layer_shapes], weight_encoding=self.config.weight_encoding,
            sessions_topic=self.config.topics.sessions, reply_topics=list(self.config.allowed_reply_topics),
            at=time.time(), task=checkpoint.task,
            realtime_kinds={kind: list(shape) for kind, shape in spec.realtime_kinds},
        )

    #: Batches being delivered (sent, waiting for the broker's acknowledgements, then committed) while the
    #: next one is fetched, checked and generated.
    IN_FLIGHT = 2

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; start() first.

        After a full batch (a backlog), up to `IN_FLIGHT` batches are delivered while the next is prepared:
        waiting for the broker's acknowledgements overlaps with fetching, checking and generating (measured
        on a backlog over the embedded broker: with none in flight the worker spent half its time in that
        wait). After a partial batch the worker waits for its delivery first, as the next batch fills.
        Each batch is committed only after the one before it: when a batch gives up, every batch after it
        is not committed either, and all of them are read again (their replies may then go out twice;
        devices drop the copies).
        """
        window: deque[tuple[list[Record], asyncio.Task]] = deque()  # oldest first
        try:
            while not stop.is_set():
                records, received_at = await self.next_batch()
                if not records:
                    continue
                replies, letters = await self.prepare(records, received_at)
                before = window[-1][1] if window else None
                window.append((records, asyncio.create_task(self.finish(records, replies, letters, stop, before))))
                # Only a full batch says more is waiting; after a partial one, waiting for its acknowledgements
                # lets the next batch fill (taken at once it would be small, its fixed costs paid again).
                keep = self.IN_FLIGHT if len(records) >= self.config.max_batch else 0
                while window and (len(window) > keep or window[0][1].done()):
                    oldest, task = window.popleft()
                    if not await task:  # it gave up, so every later batch does (`finish` waits for the one before)
                        dropped = oldest + [r for batch, _ in window for r in batch]
                        await asyncio.gather(*(t for _, t in window))
                        window.clear()
                        self._rewind(dropped)
        finally:
            await asyncio.gather(*(t for _, t in window))

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

    async def handle(self, records: list[Record], received_at: float | None = None,
                     stop: asyncio.Event | None = None) -> None:
        """Answer or dead-letter every record, then commit. Never raises for what a record holds.

        ``received_at`` is when the batch's first record was taken (default:
        now); replies carry it, so a device sees the batch wait as cloud time.
        While the broker is unreachable the batch is sent again until it is
        delivered or ``stop`` is set (then nothing is committed: whoever takes
        the partitions next serves it again).
        """
        replies, letters = await self.prepare(records, time.time() if received_at is None else received_at)
        await self.finish(records, replies, letters, stop)

    async def prepare(self, records: list[Record], received_at: float) -> tuple[list[tuple[Record, Message]],
                                                                              list[Message]]:
        """`handle`'s first half: each record's reply or dead letter, encoded, nothing sent yet."""
        by_model: dict[tuple[str, str], list[tuple[Record, SessionStart]]] = {}
        letters: list[Message] = []
        for record in records:
            try:
                event = await self._accept(record)
            except ProtocolError as exc:
                letters.append(self._dead_letter(record, str(exc)))
            except Exception as exc:
                letters.append(self._internal_error(record, exc))
            else:
                by_model.setdefault((event.model_version, event.realtime_kind), []).append((record, event))
        replies: list[tuple[Record, Message]] = []
        for (version, _), items in by_model.items():
            generated, failed = await self._generate_guarded(self.models[version], items, received_at)
            replies += generated
            letters += failed
        return replies, letters

    async def finish(self, records: list[Record], replies: list[tuple[Record, Message]], letters: list[Message],
                     stop: asyncio.Event | None, after: asyncio.Task | None = None) -> bool:
        """`handle`'s second half: deliver, then commit once ``after`` (the batch before, if still in flight)
        has committed. False if this delivery gave up (the records were rewound, to be read again) or the
        batch before did (then nothing is committed; `run` rewinds)."""
        delivered = await self._deliver(replies, letters, stop)
        if after is not None and not await after:
            return False
        if not delivered:
            # Not committed: this worker (or the next owner of the partitions) reads the batch again.
            self._rewind(records)
            return False
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            offsets[key] = max(offsets.get(key, 0), record.offset + 1)
        try:
            # Bounded: aiokafka retries some commit errors forever (a broker that lost the topic).
            await asyncio.wait_for(self.consumer.commit(offsets), self.config.commit_timeout_s)
        except Exception as exc:  # a rebalance or a lost broker: the records are served again
            self.stats.commit_failures += 1
            log.warning("commit of %d records failed (%s: %s); they will be served again", len(records),
                        type(exc).__name__, exc)
        self.stats.lag = await self.consumer.lag()
        return True

    def _rewind(self, records: list[Record]) -> None:
        """Move the consumer back to the first of these records on each of their partitions."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            first[key] = min(first.get(key, record.offset), record.offset)
        self.consumer.seek(first)

    async def _accept(self, record: Record) -> SessionStart:
        """Decode and check one request; raise `ProtocolError` naming what is wrong."""
        event = protocol.decode(record.value)
        if not isinstance(event, SessionStart):
            raise ProtocolError("type", f"{event.TYPE} does not belong on {record.topic}")
        checkpoint = self.models.get(event.model_version)
        if checkpoint is None:
            raise ProtocolError("model_version", f"{event.model_version!r} is not served here "
                                                 f"(serving {', '.join(self.models) or 'nothing'})")
        protocol.check_session_start(event, checkpoint.spec)
        if event.reply_topic not in self.config.allowed_reply_topics:
            raise ProtocolError("reply_topic", f"{event.reply_topic!r} is not a reply topic of this cloud "
                                               f"(allowed: {', '.join(self.config.allowed_reply_topics)})")
        count = await self._partition_count(event.reply_topic, event.reply_partition)
        if event.reply_partition >= count:
            raise ProtocolError("reply_partition", f"{event.reply_partition} is not a partition of "
                                                   f"{event.reply_topic} (it has {count})")
        return event

    async def _partition_count(self, topic: str, wanted: int) -> int:
        """The topic's partition count; asks the broker again (at most every 5 s) if ``wanted`` is beyond it."""
        if wanted >= self._partitions.get(topic, 0) and time.monotonic() - self._partitions_checked > 5:
            await self._refresh_partitions()
        return self._partitions.get(topic, 0)

    async def _refresh_partitions(self) -> None:
        self._partitions_checked = time.monotonic()
        for topic in self.config.allowed_reply_topics:
            try:
                self._partitions[topic] = await asyncio.wait_for(self.bus.partition_count(topic), 5)
            except Exception as exc:  # keep what we knew; the broker may be restarting
                log.warning("could not read the partitions of %s: %s", topic, exc)

    async def _generate_guarded(self, checkpoint: Checkpoint, items: list[tuple[Record, SessionStart]],
                                received_at: float) -> tuple[list[tuple[Record, Message]], list[Message]]:
        """Generate a batch; if that fails, each record alone, so one record's failure stays its own."""
        try:
            return await self._generate(checkpoint, items, received_at), []
        except Exception as exc:
            if len(items) == 1:
                return [], [self._internal_error(items[0][0], exc)]
        generated, failed = [], []
        for item in items:
            more, bad = await self._generate_guarded(checkpoint, [item], received_at)
            generated += more
            failed += bad
        return generated, failed

    async def _deliver(self, replies: list[tuple[Record, Message]], letters: list[Message],
                       stop: asyncio.Event | None) -> bool:
        """Send replies and dead letters until all are acknowledged; False if it gave up first.

        A reply the broker refuses for good (too large, not authorised) turns
        into a dead letter for its request. While the broker is unreachable the
        rest is sent again every ``retry_backoff_s`` until ``stop`` is set or
        ``delivery_timeout_s`` passed.
        """
        pending: list[tuple[Message, Record | None]] = [(m, r) for r, m in replies] + [(m, None) for m in letters]
        give_up = time.monotonic() + self.config.delivery_timeout_s
        while pending:
            results = await self.bus.send_many([m for m, _ in pending])
            retry: list[tuple[Message, Record | None]] = []
            for (message, source), error in zip(pending, results):
                if error is None:
                    continue
                if is_transient(error):
                    retry.append((message, source))
                elif source is not None:
                    reason = f"reply_partition: the broker refused the reply to {message[0]}[{message[3]}] ({_name(error)})"
                    if _name(error) == "MessageSizeTooLargeError":  # the cluster's limit, not the request's fault
                        reason += (f"; the broker must take record batches of {protocol.MAX_MESSAGE_BYTES >> 20} MiB "
                                   f"and their framing (Kafka: message.max.bytes, 1 MiB by default)")
                    retry.append((self._dead_letter(source, reason), None))
                else:
                    log.error("a dead letter to %s was refused for good (%s); dropped", message[0], _name(error))
            if any(error is not None and is_transient(error) for error in results):
                self.stats.delivery_retries += 1
                log.warning("%d messages not delivered (is the broker down?); trying again", len(retry))
                if (stop is not None and stop.is_set()) or time.monotonic() > give_up:
                    return False
                await asyncio.sleep(self.config.retry_backoff_s)
            pending = retry
        return True

    def _forward(self, checkpoint: Checkpoint, samples: list[np.ndarray]):
        """One batched generator forward; each layer's ``(W or H, b)`` as arrays with a leading batch axis."""
        start = time.perf_counter()
        factored = self.config.factored
        with torch.inference_mode():
            realtime, lengths = checkpoint.model.realtime_batch(samples)
            weights = checkpoint.model.weights_for(realtime, lengths, factored=factored)
            layers = [(layer.h.numpy(), layer.b.numpy()) if factored else (layer[0].numpy(), layer[1].numpy())
                      for layer in weights]
        return layers, (time.perf_counter() - start) * 1000

    async def _generate(self, checkpoint: Checkpoint, items: list[tuple[Record, SessionStart]],
                        received_at: float) -> list[tuple[Record, Message]]:
        # In a thread (torch releases the GIL): the consumer keeps fetching the
        # next batch while this one is generated.
        layers, generation_ms = await asyncio.to_thread(self._forward, checkpoint, [e.realtime for _, e in items])
        method = checkpoint.model.config.method
        factored = self.config.factored
        encoding = self.config.array_encoding
        encoded = protocol.layer_rows(layers, encoding)  # the batch's arrays converted at once
        replies = []
        for i, (record, event) in enumerate(items):
            reply = WeightsReady(
                session_id=event.session_id, request_id=event.request_id, device_id=event.device_id,
                model_version=event.model_version, method=method, layers=[(w[i], b[i]) for w, b in layers],
                received_at=received_at, sent_at=time.time(), generation_ms=generation_ms, batch_size=len(items),
                form="factored" if factored else "full",
            )
            replies.append((record, (event.reply_topic, protocol.encode(reply, encoding, encoded(i)),
                                     event.device_id.encode(), event.reply_partition)))
        self.stats.batches += 1
        self.stats.served += len(items)
        self.stats.batch_sizes.append(len(items))
        self.stats.generation_ms.append(generation_ms)
        return replies

    def _dead_letter(self, record: Record, reason: str) -> Message:
        self.stats.dead_letters += 1
        log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter(reason=reason, topic=record.topic, partition=record.partition, offset=record.offset,
                            original=bytes(record.value or b""), at=time.time())
        return (self.config.topics.deadletter, protocol.encode(letter), record.key, None)

    def _internal_error(self, record: Record, exc: BaseException) -> Message:
        self.stats.internal_errors += 1
        log.error("internal error on %s[%d]@%d", record.topic, record.partition, record.offset, exc_info=exc)
        return self._dead_letter(record, f"internal error: {_name(exc)}: {exc}"[:500])


def _name(exc: BaseException) -> str:
    return type(exc).__name__

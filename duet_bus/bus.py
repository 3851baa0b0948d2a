"""The Bus: how devices and the cloud exchange bytes.

`KafkaBus` speaks the real Kafka protocol through aiokafka; `MemoryBus` keeps
topics in this process with the same interface: for unit tests and for runs
that ask for it (`bus.kind: memory`), never the default of a run. Both expose:

- ``ensure_topics({name: partitions})``
- ``send(topic, value, key=None, partition=None) -> (partition, offset)``,
  returning once the broker acknowledged (acks=all on Kafka);
- ``send_many(messages) -> [None or the exception, per message]``: sends all,
  waits for every acknowledgement, and says per message what failed
  (`is_transient` tells a broker that is away from a message refused for good);
- ``partition_count(topic)``: partitions of an existing topic;
- ``group_consumer(topics, group_id)``: partitions shared by a consumer group,
  offsets committed explicitly (at-least-once);
- ``partition_consumer(topic, partition)``: one partition, no group (how a
  fleet reads its own reply partition), from its end at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, TopicAlreadyExistsError

from duet_bus.errors import ConfigError, DuetError
from duet_bus.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger("duet.bus")

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class BusUnavailable(DuetError):
    """The Kafka cluster named by the bootstrap servers cannot be reached."""


def is_transient(exc: BaseException) -> bool:
    """True for failures that go away when the broker is back (send again); False for a refusal for good."""
    if isinstance(exc, (KafkaTimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, KafkaError) and exc.retriable


@dataclass(frozen=True)
class Security:
    """How to reach a secured cluster: SASL and/or TLS, as aiokafka takes them.

    The password is a value here, never a command-line argument: the CLI and
    scenarios read it from an environment variable.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ssl_cafile: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"security protocol: must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                              f"got {self.protocol!r}")
        sasl = self.protocol.startswith("SASL_")
        if sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"sasl mechanism: {self.protocol} needs one of {', '.join(SASL_MECHANISMS)}, "
                                  f"got {self.sasl_mechanism!r}")
            if not self.username or self.password is None:
                raise ConfigError(f"sasl: {self.protocol} needs a username and a password")
        elif self.sasl_mechanism or self.username:
            raise ConfigError(f"sasl settings given but the security protocol is {self.protocol} "
                              f"(use SASL_PLAINTEXT or SASL_SSL)")
        if self.ssl_cafile and not self.protocol.endswith("SSL"):
            raise ConfigError(f"ssl cafile given but the security protocol is {self.protocol} (use SSL or SASL_SSL)")

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every aiokafka client of a `KafkaBus` gets."""
        if self.protocol == "PLAINTEXT":
            return {}
        out: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            try:
                out["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"ssl cafile {self.ssl_cafile!r}: {exc}") from exc
        if self.protocol.startswith("SASL_"):
            out.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                       sasl_plain_password=self.password)
        return out


@dataclass(frozen=True)
class Topics:
    """Topic names and partition counts (all configurable)."""

    sessions: str = "duet.sessions"
    weights: str = "duet.weights"
    reports: str = "duet.reports"
    deadletter: str = "duet.deadletter"
    models: str = "duet.models"
    session_partitions: int = 4
    weight_partitions: int = 4

    def all(self) -> dict[str, int]:
        return {self.sessions: self.session_partitions, self.weights: self.weight_partitions,
                self.reports: 1, self.deadletter: 1, self.models: 1}


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


class Consumer:
    """What both buses return from ``group_consumer`` / ``partition_consumer``."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]: ...
    async def commit(self, offsets: dict[tuple[str, int], int]) -> None: ...
    def seek(self, offsets: dict[tuple[str, int], int]) -> None: ...
    def assignment(self) -> set[tuple[str, int]]: ...
    async def lag(self) -> int: ...


# --------------------------------------------------------------------------- Kafka


class KafkaBus:
    """The real thing. ``security`` passes SASL/TLS settings through to every aiokafka client.

    ``fetch_max_wait_ms`` (default 5) bounds how long the broker may hold a
    fetch that has no data yet. The embedded Tansu broker holds it for about
    the whole time even when data arrives, so each consumer hop costs about
    this much (measured: 5.5 ms per hop at 5, 12.7 ms at 20); lower it for
    latency, raise it to poll less.

    A group consumer's session times out after ``session_timeout_ms`` (6 s,
    the smallest Apache Kafka allows by default) and it heartbeats every
    ``heartbeat_interval_ms`` (1 s): a worker killed without leaving the group
    loses its partitions after about 6 s, and a new worker is taken in at the
    members' next heartbeat.

    The producer's record batches hold up to `MAX_BATCH_BYTES` per partition, as much as one message may
    be (so a broker that takes the largest message takes any batch).
    aiokafka keeps one produce request in flight per broker, holding at most one batch per partition, so
    the batch size is what one round trip moves to a partition. Measured on a cloud worker's backlog (256
    GRU4Rec replies, 2.25 MB, all to one reply partition): aiokafka's default 16 KiB batches held one
    reply per request; 1 MiB batches made three requests and tripled sessions/s, but their
    acknowledgements were still the worker's limit; 4 MiB batches make one (`make bench-bus`).
    """

    MAX_BATCH_BYTES = MAX_MESSAGE_BYTES

    def __init__(self, bootstrap: str, client_id: str = "duet-bus", fetch_max_wait_ms: int = 5,
                 security: Security | None = None, session_timeout_ms: int = 6000,
                 heartbeat_interval_ms: int = 1000) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.security = security.aiokafka_kwargs() if security else {}
        self._producer: AIOKafkaProducer | None = None
        self._topics: dict[str, int] = {}  # every topic ensured, to create again if the broker lost them
        self._max_request_size = 8 * 1024 * 1024

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", linger_ms=0,
            max_request_size=self._max_request_size, max_batch_size=self.MAX_BATCH_BYTES, **self.security,
        )
        async with self._reaching():
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @contextlib.asynccontextmanager
    async def _reaching(self):
        """Turn a failed connection at start into one line naming the address and what to do."""
        try:
            yield
        except (KafkaError, OSError) as exc:
            raise BusUnavailable(
                f"cannot reach Kafka at {self.bootstrap} ({type(exc).__name__}); start a broker with "
                f"`duet broker` and pass the address it prints, or point --bootstrap at your cluster"
            ) from exc

    async def ensure_topics(self, topics: dict[str, int]) -> None:
        """Create the topics that do not exist yet (partition counts as given, replication 1)."""
        self._topics.update(topics)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.security)
        async with self._reaching():
            await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing]
            if new:
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass  # another process won the race
        finally:
            await admin.close()

    async def recreate_topics(self) -> None:
        """Ensure again every topic this bus ensured (after a broker that lost its data came back)."""
        await self.ensure_topics(dict(self._topics))

    async def partition_count(self, topic: str) -> int:
        return len(await self._producer.partitions_for(topic))

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> tuple[int, int]:
        meta = await self._producer.send_and_wait(topic, value, key=key, partition=partition)
        return meta.partition, meta.offset

    async def send_many(self, messages: list[tuple[str, bytes, bytes | None, int | None]]) -> list[BaseException | None]:
        """Send several messages; wait for every acknowledgement; per message None or what failed.

        Messages to a named partition go out as one record batch per partition (`_send_batches`); the
        others (keyed, placed by the producer's partitioner) one by one.
        """
        sent: list[tuple[asyncio.Future | BaseException, list[int]]] = []  # an acknowledgement, the messages
        by_partition: dict[tuple[str, int], list[int]] = {}
        for i, (topic, value, key, partition) in enumerate(messages):
            if partition is not None:
                by_partition.setdefault((topic, partition), []).append(i)
                continue
            try:
                sent.append((await self._producer.send(topic, value, key=key), [i]))
            except Exception as exc:  # refused before it left (too large, ...)
                sent.append((exc, [i]))
        for (topic, partition), indices in by_partition.items():
            sent += await self._send_batches(topic, partition, [(i, messages[i][1], messages[i][2]) for i in indices])
        acks = iter(await asyncio.gather(*(f for f, _ in sent if not isinstance(f, BaseException)),
                                         return_exceptions=True))
        out: list[BaseException | None] = [None] * len(messages)
        for future, covered in sent:
            result = future if isinstance(future, BaseException) else next(acks)
            if isinstance(result, BaseException):
                for i in covered:
                    out[i] = result
        return out

    async def _send_batches(self, topic: str, partition: int, items: list[tuple[int, bytes, bytes | None]]
                            ) -> list[tuple[asyncio.Future | BaseException, list[int]]]:
        """Messages ``(index, value, key)`` to one partition as few record batches as fit, each with the
        indices it holds (aiokafka's `send` costs about 10 us a message in Python; appending to a batch is
        one C call). The broker acknowledges, or refuses, a record batch as a whole, which is also what
        happens to messages that `send` put in one batch."""
        sent: list[tuple[asyncio.Future | BaseException, list[int]]] = []
        batch, members = self._producer.create_batch(), []

        async def submit() -> None:
            try:
                sent.append((await self._producer.send_batch(batch, topic, partition=partition), members))
            except Exception as exc:  # an unknown partition, a closed producer: every message of the batch
                sent.append((exc, members))

        for i, value, key in items:
            size = len(value or b"") + len(key or b"")
            if size > self._max_request_size:
                sent.append((MessageSizeTooLargeError(f"{size} bytes exceed max_request_size "
                                                      f"{self._max_request_size}"), [i]))
                continue
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start the next
                await submit()
                batch, members = self._producer.create_batch(), []
                batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any one record
            members.append(i)
        if members:
            await submit()
        return sent

    def group_consumer(self, topics: list[str], group_id: str) -> Consumer:
        return _KafkaConsumer(self, topics=topics, group_id=group_id)

    def partition_consumer(self, topic: str, partition: int, from_start: bool = False) -> Consumer:
        """A consumer of one partition from its end (what arrives from now on), or ``from_start``."""
        return _KafkaConsumer(self, assign=[TopicPartition(topic, partition)], from_start=from_start)


class _KafkaConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topics: list[str] | None = None, group_id: str | None = None,
                 assign: list[TopicPartition] | None = None, from_start: bool = False) -> None:
        self._assign = assign
        self._from_start = from_start
        self._topics = topics or []
        # "earliest" also for a partition consumer: it starts at the end (seek_to_end),
        # and if its position ever falls off the log (a broker that lost its data
        # and came back) everything on the partition is new to it.
        self._bus = bus
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap, client_id=bus.client_id, group_id=group_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=bus.heartbeat_interval_ms,
            fetch_max_wait_ms=bus.fetch_max_wait_ms, max_partition_fetch_bytes=8 * 1024 * 1024, **bus.security,
        )

    async def start(self) -> None:
        async with self._bus._reaching():
            try:
                await self._consumer.start()
            except BaseException:
                await self._consumer.stop()
                raise
        if self._assign:
            self._consumer.assign(self._assign)
            if self._from_start:
                await self._consumer.seek_to_beginning(*self._assign)
            else:
                await self._consumer.seek_to_end(*self._assign)
        else:
            self._consumer.subscribe(self._topics)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if not batches:
            await self._restart_lost_partitions()
        return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                for msgs in batches.values() for m in msgs]

    async def _restart_lost_partitions(self) -> None:
        """Read a partition again from its start when the broker's log ends before our position.

        That happens when a broker lost its data and came back (the embedded
        broker keeps its log in memory): its fetches then return nothing, with
        no error, for ever; and it stores records for a topic only once the
        topic is created again. Everything on the new log is new to us.
        """
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            try:
                position = await self._consumer.position(tp)
            except Exception:  # position unknown during a rebalance
                continue
            if end is not None and position > end:
                log.warning("%s[%d]: the broker's log ends at %d, before our position %d (it lost its data?); "
                            "creating the topics again and reading it from the start", tp.topic, tp.partition,
                            end, position)
                try:
                    await self._bus.recreate_topics()
                except Exception as exc:  # the next empty fetch tries again
                    log.warning("could not create the topics again: %s", exc)
                    return
                await self._consumer.seek_to_beginning(tp)

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if offsets:
            await self._consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        assigned = self._consumer.assignment()
        for (topic, partition), offset in offsets.items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:  # a partition lost in a rebalance is read again by its new owner
                self._consumer.seek(tp, offset)

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def lag(self) -> int:
        """Records behind the partitions' high watermarks, as of the last fetch.

        Uses what the fetch responses already carried (no request to the
        broker): called after every cloud batch, it must not cost a round trip.
        """
        total = 0
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is None:
                continue  # nothing fetched from it yet
            try:
                total += max(0, end - await self._consumer.position(tp))
            except Exception:  # position unknown during a rebalance
                continue
        return total


# --------------------------------------------------------------------------- memory


@dataclass
class _Group:
    members: list["_MemoryConsumer"] = field(default_factory=list)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


class _Log(list):
    """A partition of the in-process bus: its records from offset ``base`` on (older ones were deleted)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = 0
        self.bytes = 0

    def end(self) -> int:
        """The offset the next record gets."""
        return self.base + len(self)


class MemoryBus:
    """In-process topics with the KafkaBus interface: for tests and `bus.kind: memory` runs.

    Like a Kafka topic with ``retention.bytes``, a partition may keep only its most recent
    ``retention_bytes`` of record values (deleting the oldest in chunks); a consumer whose position was
    deleted reads on from the oldest record kept. The runner sets it (`RUN_RETENTION`): without it a
    long run kept every report and reply. None (tests): everything is kept.
    """

    def __init__(self, retention_bytes: int | None = None) -> None:
        self.retention_bytes = retention_bytes
        self.topics: dict[str, list[_Log]] = {}
        self.groups: dict[str, _Group] = defaultdict(_Group)
        self._changed = asyncio.Event()

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def ensure_topics(self, topics: dict[str, int]) -> None:
        for name, parts in topics.items():
            self.topics.setdefault(name, [_Log() for _ in range(parts)])

    async def partition_count(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> tuple[int, int]:
        if topic not in self.topics:
            self.topics[topic] = [_Log()]
        parts = self.topics[topic]
        if partition is None:
            partition = (hash(key) if key is not None else parts[0].end()) % len(parts)
        if not 0 <= partition < len(parts):
            raise KafkaError(f"{topic} has no partition {partition}")
        log = parts[partition]
        offset = log.end()
        log.append(Record(topic, partition, offset, key, value, int(time.time() * 1000)))
        log.bytes += len(value or b"")  # a tombstone (None) holds no bytes
        if self.retention_bytes is not None and log.bytes > self.retention_bytes * 5 // 4:  # in chunks: O(1) each
            drop = 0
            while log.bytes > self.retention_bytes:
                log.bytes -= len(log[drop].value or b"")
                drop += 1
            del log[:drop]
            log.base += drop
        self._changed.set()
        return partition, offset

    async def send_many(self, messages: list[tuple[str, bytes, bytes | None, int | None]]) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for topic, value, key, partition in messages:
            try:
                await self.send(topic, value, key, partition)
                out.append(None)
            except Exception as exc:  # as Kafka refuses a partition that does not exist
                out.append(exc)
        return out

    def group_consumer(self, topics: list[str], group_id: str) -> Consumer:
        return _MemoryConsumer(self, topics, group_id)

    def partition_consumer(self, topic: str, partition: int, from_start: bool = False) -> Consumer:
        return _MemoryConsumer(self, [topic], None, fixed=(topic, partition), from_start=from_start)

    async def _wait(self, timeout_ms: int) -> None:
        # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation
        # that races with completion, and a cancelled consumer loop would run on.
        self._changed.clear()
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout_ms / 1000)
        finally:
            waiter.cancel()


class _MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, topics: list[str], group_id: str | None,
                 fixed: tuple[str, int] | None = None, from_start: bool = False) -> None:
        self.bus, self.topics, self.group_id, self.fixed = bus, topics, group_id, fixed
        self.from_start = from_start
        self.positions: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        if self.fixed:
            log = self.bus.topics[self.fixed[0]][self.fixed[1]]
            self.positions[self.fixed] = log.base if self.from_start else log.end()
        else:
            self.bus.groups[self.group_id].members.append(self)

    async def stop(self) -> None:
        if self.group_id and self in self.bus.groups[self.group_id].members:
            self.bus.groups[self.group_id].members.remove(self)

    def assignment(self) -> set[tuple[str, int]]:
        if self.fixed:
            return {self.fixed}
        members = self.bus.groups[self.group_id].members
        index = members.index(self)
        parts = [(t, p) for t in self.topics for p in range(len(self.bus.topics.get(t, [])))]
        return {tp for i, tp in enumerate(parts) if i % len(members) == index}

    def _position(self, tp: tuple[str, int]) -> int:
        if tp not in self.positions:
            self.positions[tp] = self.bus.groups[self.group_id].committed.get(tp, 0) if self.group_id else 0
        return self.positions[tp]

    def _ready(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp in sorted(self.assignment()):
            log = self.bus.topics[tp[0]][tp[1]]
            start = max(self._position(tp), log.base)
            take = log[start - log.base : start - log.base + max_records - len(out)]
            self.positions[tp] = start + len(take)
            out.extend(take)
        return out

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        records = self._ready(max_records)
        if not records:
            await self.bus._wait(timeout_ms)
            records = self._ready(max_records)
        return records

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if self.group_id:
            self.bus.groups[self.group_id].committed.update(offsets)

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        self.positions.update(offsets)

    async def lag(self) -> int:
        return sum(self.bus.topics[t][p].end() - max(self._position((t, p)), self.bus.topics[t][p].base)
                   for t, p in self.assignment())

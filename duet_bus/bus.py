"""The Bus: how devices and the cloud exchange bytes.

`KafkaBus` speaks the real Kafka protocol through aiokafka; `MemoryBus` keeps
topics in this process with the same interface and is for unit tests only,
never the default of a run. Both expose:

- ``ensure_topics({name: partitions})``
- ``send(topic, value, key=None, partition=None) -> (partition, offset)``,
  returning once the broker acknowledged (acks=all on Kafka);
- ``group_consumer(topics, group_id)``: partitions shared by a consumer group,
  offsets committed explicitly (at-least-once);
- ``partition_consumer(topic, partition)``: one partition, no group (how a
  fleet reads its own reply partition).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from duet_bus.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


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
    session_partitions: int = 4
    weight_partitions: int = 4

    def all(self) -> dict[str, int]:
        return {self.sessions: self.session_partitions, self.weights: self.weight_partitions,
                self.reports: 1, self.deadletter: 1}


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

    The producer batches up to 1 MiB per partition (aiokafka's default is
    16 KiB, which holds one fp32 ``WeightsReady`` of a 64x128 layer at most):
    a cloud batch of 256 replies to one reply partition then goes out in a
    few requests instead of 256 (measured: 3x the worker's sessions/s).
    """

    def __init__(self, bootstrap: str, client_id: str = "duet-bus", fetch_max_wait_ms: int = 5,
                 security: Security | None = None) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.security = security.aiokafka_kwargs() if security else {}
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", linger_ms=0,
            max_request_size=8 * 1024 * 1024, max_batch_size=1024 * 1024, **self.security,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ensure_topics(self, topics: dict[str, int]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id, **self.security)
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

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> tuple[int, int]:
        meta = await self._producer.send_and_wait(topic, value, key=key, partition=partition)
        return meta.partition, meta.offset

    async def send_many(self, messages: list[tuple[str, bytes, bytes | None, int | None]]) -> None:
        """Send several messages and wait until all are acknowledged."""
        futures = [await self._producer.send(t, v, key=k, partition=p) for t, v, k, p in messages]
        await asyncio.gather(*futures)

    def group_consumer(self, topics: list[str], group_id: str) -> Consumer:
        return _KafkaConsumer(self, topics=topics, group_id=group_id)

    def partition_consumer(self, topic: str, partition: int) -> Consumer:
        return _KafkaConsumer(self, assign=[TopicPartition(topic, partition)])


class _KafkaConsumer(Consumer):
    def __init__(self, bus: KafkaBus, topics: list[str] | None = None, group_id: str | None = None,
                 assign: list[TopicPartition] | None = None) -> None:
        self._assign = assign
        self._topics = topics or []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bus.bootstrap, client_id=bus.client_id, group_id=group_id,
            enable_auto_commit=False, auto_offset_reset="earliest" if group_id else "latest",
            fetch_max_wait_ms=bus.fetch_max_wait_ms, max_partition_fetch_bytes=8 * 1024 * 1024, **bus.security,
        )

    async def start(self) -> None:
        await self._consumer.start()
        if self._assign:
            self._consumer.assign(self._assign)
            await self._consumer.seek_to_end(*self._assign)
        else:
            self._consumer.subscribe(self._topics)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
                for msgs in batches.values() for m in msgs]

    async def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if offsets:
            await self._consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})

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


class MemoryBus:
    """In-process topics with the KafkaBus interface. For unit tests only."""

    def __init__(self) -> None:
        self.topics: dict[str, list[list[Record]]] = {}
        self.groups: dict[str, _Group] = defaultdict(_Group)
        self._changed = asyncio.Event()

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def ensure_topics(self, topics: dict[str, int]) -> None:
        for name, parts in topics.items():
            self.topics.setdefault(name, [[] for _ in range(parts)])

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   partition: int | None = None) -> tuple[int, int]:
        if topic not in self.topics:
            self.topics[topic] = [[]]
        parts = self.topics[topic]
        if partition is None:
            partition = (hash(key) if key is not None else len(parts[0])) % len(parts)
        log = parts[partition]
        log.append(Record(topic, partition, len(log), key, value, int(time.time() * 1000)))
        self._changed.set()
        return partition, len(log) - 1

    async def send_many(self, messages: list[tuple[str, bytes, bytes | None, int | None]]) -> None:
        for topic, value, key, partition in messages:
            await self.send(topic, value, key, partition)

    def group_consumer(self, topics: list[str], group_id: str) -> Consumer:
        return _MemoryConsumer(self, topics, group_id)

    def partition_consumer(self, topic: str, partition: int) -> Consumer:
        return _MemoryConsumer(self, [topic], None, fixed=(topic, partition))

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
                 fixed: tuple[str, int] | None = None) -> None:
        self.bus, self.topics, self.group_id, self.fixed = bus, topics, group_id, fixed
        self.positions: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        if self.fixed:
            self.positions[self.fixed] = len(self.bus.topics[self.fixed[0]][self.fixed[1]])
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
            start = self._position(tp)
            take = log[start : start + max_records - len(out)]
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

    async def lag(self) -> int:
        return sum(len(self.bus.topics[t][p]) - self._position((t, p)) for t, p in self.assignment())

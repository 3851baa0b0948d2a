"""Many device agents in one process, sharing one reply partition.

The fleet owns the process's Kafka producer and one consumer assigned to its
reply partition of the weights topic (the request-reply pattern: every
request names that topic and partition). A dispatcher task hands each reply
to the agent waiting for its session; a reply for a session nobody waits for
(a duplicate after at-least-once redelivery, a late reply after a timeout, or
another fleet's) and a reply whose device id does not match are dropped and
counted. Replies that fail validation are counted as invalid and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from duet_bus import protocol
from duet_bus.bus import Topics
from duet_bus.data.streams import DeviceSession
from duet_bus.errors import ConfigError
from duet_bus.finetune import FinetuneConfig
from duet_bus.protocol import ProtocolError, SessionStart, WeightsReady

log = logging.getLogger("duet.devices")


@dataclass(frozen=True)
class FleetConfig:
    fleet_id: str = "fleet-0"
    reply_partition: int = 0
    deadline_s: float = 2.0  # how long a device waits for its weights before falling back
    topics: Topics = field(default_factory=Topics)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    publish_reports: bool = True

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError(f"devices.deadline_s: must be positive, got {self.deadline_s!r}")
        if not 0 <= self.reply_partition < self.topics.weight_partitions:
            raise ConfigError(f"devices.reply_partition: must be in 0..{self.topics.weight_partitions - 1}, "
                              f"got {self.reply_partition}")


@dataclass
class FleetStats:
    sessions: int = 0
    fallbacks: int = 0
    dropped_duplicates: int = 0
    dropped_foreign: int = 0
    invalid_replies: int = 0


class Fleet:
    def __init__(self, bus, config: FleetConfig | None = None) -> None:
        self.bus = bus
        self.config = config or FleetConfig()
        self.stats = FleetStats()
        self._pending: dict[str, tuple[str, asyncio.Future]] = {}
        self._consumer = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        # Every simulated device stands for a phone of its own: their compute
        # runs one at a time, so each measured time is one device's, not
        # inflated by the other devices of this process sharing the CPU.
        self.compute_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.bus.ensure_topics(self.config.topics.all())
        self._consumer = self.bus.partition_consumer(self.config.topics.weights, self.config.reply_partition)
        await self._consumer.start()
        self._task = asyncio.create_task(self._dispatch(), name=f"{self.config.fleet_id}-dispatch")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _dispatch(self) -> None:
        while not self._stopping:
            for record in await self._consumer.getmany(timeout_ms=100, max_records=1000):
                received = time.time()
                try:
                    reply = protocol.decode(record.value)
                    if not isinstance(reply, WeightsReady):
                        raise ProtocolError("type", f"{reply.TYPE} does not belong on {record.topic}")
                except ProtocolError as exc:
                    self.stats.invalid_replies += 1
                    log.warning("invalid reply at %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
                    continue
                waiting = self._pending.get(reply.session_id)
                if waiting is None:
                    self.stats.dropped_duplicates += 1
                    continue
                device, future = waiting
                if reply.device_id != device:
                    self.stats.dropped_foreign += 1
                elif future.done():  # a redelivered copy that came before its waiter left
                    self.stats.dropped_duplicates += 1
                else:
                    future.set_result((reply, received, len(record.value)))

    async def request(self, agent, session: DeviceSession, delay: dict[str, float],
                      payload: dict[str, int]) -> WeightsReady | None:
        """Ask the cloud for a session's weights; None if they do not come in time (or are invalid)."""
        future = asyncio.get_running_loop().create_future()
        self._pending[session.session_id] = (agent.device_id, future)
        sent_at = time.time()
        request = protocol.encode(SessionStart(
            session_id=session.session_id, device_id=agent.device_id, model_version=agent.checkpoint.model_version,
            realtime=np.asarray(session.realtime, np.int64), reply_topic=self.config.topics.weights,
            reply_partition=self.config.reply_partition, sent_at=sent_at,
        ))
        payload["upload"] = len(request)
        try:
            await self.bus.send(self.config.topics.sessions, request, key=agent.device_id.encode())
            reply, received_at, size = await asyncio.wait_for(future, self.config.deadline_s)
        except asyncio.TimeoutError:
            self.stats.fallbacks += 1
            return None
        finally:
            self._pending.pop(session.session_id, None)
        try:
            protocol.check_weights(reply, agent.checkpoint.spec)
        except ProtocolError as exc:
            self.stats.invalid_replies += 1
            self.stats.fallbacks += 1
            log.warning("session %s: unusable weights: %s", session.session_id, exc)
            return None
        payload["download"] = size
        cloud_ms = (reply.sent_at - reply.received_at) * 1000
        delay["round_trip_ms"] = (received_at - sent_at) * 1000
        delay["generation_ms"] = reply.generation_ms
        delay["cloud_ms"] = cloud_ms
        delay["bus_ms"] = delay["round_trip_ms"] - cloud_ms
        return reply

    async def run(self, agent, session: DeviceSession) -> protocol.SessionReport:
        """Run one session on an agent; publish its report; return it."""
        report = await agent.run_session(session)
        self.stats.sessions += 1
        if self.config.publish_reports:
            await self.bus.send(self.config.topics.reports, protocol.encode(report), key=agent.device_id.encode())
        return report

"""Many device agents in one process, sharing one reply partition.

The fleet owns the process's Kafka producer and one consumer assigned to its
reply partition of the weights topic (the request-reply pattern: every
request names that topic and partition). Every request carries a fresh
random ``request_id``; a dispatcher task hands a reply to the agent waiting
for that request id, and to no one else. So a reply left on the partition by
an earlier run, or by another fleet, can never be taken for an answer, however
the consumer's start offset came out (the embedded broker can report a wrong
end offset). Dropped and counted: a reply to one of our requests whose waiter
has left (a duplicate after at-least-once redelivery, or late after the
deadline), a reply to a request we never sent (stale or foreign), and a reply
that fails validation.

Nothing on the bus can hang a device: sending the request and waiting for
the reply share one deadline, after which the device falls back. Reports are
published by a background task from a bounded queue, so a slow or absent
broker never holds a session up; what cannot be published (the queue full,
or still unsent when the fleet stops) is counted, never silently lost.
Session ids on the wire carry the fleet's run id, so they are unique per run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

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
    report_queue: int = 10_000  # reports waiting to be published at most; beyond, counted as unpublished
    run_id: str = ""  # tags this run's session ids on the wire; empty: a random one per fleet
    # What a device uploads as its real-time samples (paper Table 3; `protocol.UPLOADS`): "samples" (item ids,
    # float32 images), "images_uint8" (8-bit pixels) or "embeddings" (an image model's static-layer features,
    # computed on the device). Item ids stay ids.
    upload: str = "samples"
    # `run_many`: the share of sessions whose device compute is also timed alone (the rest are calibrated).
    timing_share: float = 0.01
    batch_sessions: int = 128  # `run_many`: sessions per stacked computation at most

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError(f"devices.deadline_s: must be positive, got {self.deadline_s!r}")
        if not 0 <= self.timing_share <= 1:
            raise ConfigError(f"devices.timing_share: must be in [0, 1], got {self.timing_share!r}")
        if self.upload not in protocol.UPLOADS:
            raise ConfigError(f"devices.upload: must be one of {', '.join(protocol.UPLOADS)}, got {self.upload!r}")
        if not 0 <= self.reply_partition < self.topics.weight_partitions:
            raise ConfigError(f"devices.reply_partition: must be in 0..{self.topics.weight_partitions - 1}, "
                              f"got {self.reply_partition}")


@dataclass
class FleetStats:
    sessions: int = 0
    fallbacks: int = 0
    dropped_duplicates: int = 0  # replies to our requests whose device no longer waits (redelivered or late)
    dropped_foreign: int = 0  # replies to requests this fleet never sent (an earlier run, another fleet)
    invalid_replies: int = 0
    send_failures: int = 0  # requests the bus did not take in time (the device fell back)
    reports_unpublished: int = 0  # reports the bus did not take in time (the session still counts)
    dispatch_errors: int = 0  # failures of the reply loop itself (it goes on)


# Request ids this fleet sent, remembered to tell a late or repeated reply from a foreign one.
_REMEMBERED = 100_000


class Fleet:
    def __init__(self, bus, config: FleetConfig | None = None) -> None:
        self.bus = bus
        self.config = config or FleetConfig()
        self.stats = FleetStats()
        self.run_id = self.config.run_id or secrets.token_hex(4)
        self._pending: dict[str, tuple[str, asyncio.Future]] = {}  # request id -> (device id, reply future)
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._consumer = None
        self._task: asyncio.Task | None = None
        self._reports: asyncio.Queue = asyncio.Queue(self.config.report_queue)
        self._publisher: asyncio.Task | None = None
        self._stopping = False
        # Every simulated device stands for a phone of its own: their compute
        # runs one at a time, so each measured time is one device's, not
        # inflated by the other devices of this process sharing the CPU.
        self.compute_lock = asyncio.Lock()
        self.calibration = Calibration(self.config.timing_share)

    async def start(self) -> None:
        await self.bus.ensure_topics(self.config.topics.all())
        self._consumer = self.bus.partition_consumer(self.config.topics.weights, self.config.reply_partition)
        await self._consumer.start()
        self._task = asyncio.create_task(self._dispatch(), name=f"{self.config.fleet_id}-dispatch")
        self._publisher = asyncio.create_task(self._publish(), name=f"{self.config.fleet_id}-reports")

    async def stop(self, flush_s: float = 5.0) -> None:
        """Stop taking replies; publish the reports still queued for at most ``flush_s``."""
        if self._publisher is not None:
            try:
                await asyncio.wait_for(self._reports.join(), flush_s)
            except asyncio.TimeoutError:
                pass
            await _cancel(self._publisher)
            self._publisher = None
            self.stats.reports_unpublished += self._reports.qsize()
        self._stopping = True
        if self._task is not None:
            await _cancel(self._task)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    def session_id(self, session: DeviceSession) -> str:
        """The session's id on the wire: unique per run."""
        return f"{session.session_id}@{self.run_id}"

    async def _dispatch(self) -> None:
        while not self._stopping:
            try:
                records = await self._consumer.getmany(timeout_ms=100, max_records=1000)
            except Exception as exc:  # the reply loop outlives any broker trouble
                self.stats.dispatch_errors += 1
                log.warning("reading replies failed (%s: %s); trying again", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            for record in records:
                try:
                    self._take(record)
                except Exception:  # a bug of ours: this reply is lost, the loop goes on
                    self.stats.dispatch_errors += 1
                    log.exception("reply at %s[%d]@%d", record.topic, record.partition, record.offset)

    def _take(self, record) -> None:
        """Route one reply to the device waiting for it. Only the map and its ids are read here; the device
        checks the rest (`request`), as a phone decodes its own reply: one loop serves the whole fleet, and
        decoding every reply of a fetch before routing the next made each reply wait for the others'
        (at 100 in flight, 50 decodes before the median reply)."""
        received = time.time()
        try:
            body = protocol.unpack(record.value)
            if body["type"] != WeightsReady.TYPE:
                raise ProtocolError("type", f"{body['type']} does not belong on {record.topic}")
            request_id, device_id = body.get("request_id"), body.get("device_id")
            if type(request_id) is not str or type(device_id) is not str:
                raise ProtocolError("request_id", "a reply needs request_id and device_id strings")
        except ProtocolError as exc:
            self.stats.invalid_replies += 1
            log.warning("invalid reply at %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
            return
        waiting = self._pending.get(request_id)
        if waiting is None:
            if request_id in self._sent:
                self.stats.dropped_duplicates += 1
            else:
                self.stats.dropped_foreign += 1
            return
        device, future = waiting
        if device_id != device:
            self.stats.dropped_foreign += 1
        elif future.done():  # a redelivered copy that came before its waiter left
            self.stats.dropped_duplicates += 1
        else:
            future.set_result((body, received, len(record.value)))

    async def request(self, agent, session: DeviceSession, delay: dict[str, float],
                      payload: dict[str, int]) -> WeightsReady | None:
        """Ask the cloud for a session's weights; None if they do not come in time (or are invalid)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request_id = protocol.new_request_id()
        self._pending[request_id] = (agent.device_id, future)
        self._sent[request_id] = None
        if len(self._sent) > _REMEMBERED:
            self._sent.popitem(last=False)
        if self.config.upload == "embeddings":
            # The device's static layers run on its real-time samples before the request: device compute,
            # off the event loop and one device at a time like scoring (`compute_lock`), so that it neither
            # stalls other devices' replies nor counts their compute as its own.
            async with self.compute_lock:
                begin = time.perf_counter()
                realtime, kind = await asyncio.to_thread(agent.checkpoint.model.upload, session.realtime,
                                                         self.config.upload)
                if kind == "embeddings":
                    delay["embed_ms"] = (time.perf_counter() - begin) * 1000
        else:
            realtime, kind = agent.checkpoint.model.upload(session.realtime, self.config.upload)
        sent_at = time.time()
        deadline = loop.time() + self.config.deadline_s
        request = protocol.encode(SessionStart(
            session_id=self.session_id(session), request_id=request_id, device_id=agent.device_id,
            model_version=agent.checkpoint.model_version, realtime=realtime, realtime_kind=kind,
            reply_topic=self.config.topics.weights, reply_partition=self.config.reply_partition, sent_at=sent_at,
        ))
        payload["upload"] = len(request)
        try:
            try:
                await asyncio.wait_for(self.bus.send(self.config.topics.sessions, request,
                                                     key=agent.device_id.encode()), self.config.deadline_s)
            except Exception as exc:
                if not isinstance(exc, asyncio.TimeoutError):
                    log.warning("session %s: request not sent (%s: %s)", session.session_id, type(exc).__name__, exc)
                self.stats.send_failures += 1
                self.stats.fallbacks += 1
                return None
            body, received_at, size = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            self.stats.fallbacks += 1
            return None
        finally:
            self._pending.pop(request_id, None)
        try:
            reply = protocol.parse(body)
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
        self._published(report, agent.device_id)
        return report

    def _published(self, report: protocol.SessionReport, device_id: str) -> None:
        self.stats.sessions += 1
        if self.config.publish_reports:
            try:
                self._reports.put_nowait((protocol.encode(report), device_id.encode()))
            except asyncio.QueueFull:
                self.stats.reports_unpublished += 1

    async def run_many(self, agents: list, sessions: list[DeviceSession]) -> list[protocol.SessionReport]:
        """`run` for many devices' sessions of one method at one instant, batched: the requests go out
        together, and the device-side computation (fine-tuning, scoring) of all of them is one stacked
        computation. Every session's scores are what its device computes alone, to float rounding.

        A device's compute time cannot be read off a batched computation (a batch's time divided by its
        size is not one device's time). So a hashed share of the sessions (`FleetConfig.timing_share`; one
        of a method's first batch if none of it is) is computed alone, exactly as `run` does, and timed;
        the others report the calibration those give (`Calibration`), named as such in their report:
        ``device_compute_calibrated_ms`` and ``finetune_calibrated_ms`` instead of ``device_compute_ms``
        and ``finetune_ms``.
        """
        if not agents:
            return []
        method, model = agents[0].method, agents[0].checkpoint.model
        delays: list[dict[str, float]] = [{} for _ in sessions]
        payloads: list[dict[str, int]] = [{} for _ in sessions]
        fallback = [False] * len(sessions)
        global_layers = agents[0].checkpoint.global_layers
        weights: list | None = None  # per session; None: the global classifier for all
        if method not in ("base", "finetune"):
            replies = await asyncio.gather(*(self.request(a, s, d, p)
                                             for a, s, d, p in zip(agents, sessions, delays, payloads)))
            weights = []
            for i, (agent, reply) in enumerate(zip(agents, replies)):
                fallback[i] = reply is None
                weights.append(global_layers if reply is None else agent.weights_from(reply))
        timed = [i for i, s in enumerate(sessions) if self.calibration.measures(method, s.session_id)]
        if not timed and not self.calibration.ready(method):
            timed = [0]
        alone = set(timed)
        rest = [i for i in range(len(sessions)) if i not in alone]
        scores: list = [None] * len(sessions)
        async with self.compute_lock:
            for i in timed:  # one device, as `run` computes it, timed
                agent, session = agents[i], sessions[i]
                if method == "finetune":
                    agent.weights, delays[i]["finetune_ms"] = await asyncio.to_thread(agent.finetune, session)
                else:
                    agent.weights = global_layers if weights is None else weights[i]
                scores[i], delays[i]["device_compute_ms"] = await asyncio.to_thread(agent.score, session)
                self.calibration.add(method, delays[i], len(session.samples))
            size = self.config.batch_sessions  # bounds the memory of one computation
            for chunk in (rest[k: k + size] for k in range(0, len(rest), size)):
                batch = [sessions[i].samples for i in chunk]
                if method == "finetune":
                    layers = await asyncio.to_thread(model.finetune_many, global_layers,
                                                     [sessions[i].recent for i in chunk], self.config.finetune)
                elif weights is None:
                    layers = global_layers
                else:
                    layers = [weights[i] for i in chunk]
                batched = await asyncio.to_thread(_inference, model.score_many, batch, layers)
                for i, out in zip(chunk, batched):
                    scores[i] = out
                    delays[i].update(self.calibration.estimate(method, len(sessions[i].samples)))
        reports = [agent.report(*row) for agent, *row in zip(agents, sessions, scores, fallback, delays, payloads)]
        for report in reports:
            self._published(report, report.device_id)
        return reports

    async def _publish(self) -> None:
        """Send what is queued, together; a report the bus does not take in time is counted and dropped."""
        while True:
            batch = [await self._reports.get()]
            while not self._reports.empty() and len(batch) < 1000:
                batch.append(self._reports.get_nowait())
            try:
                results = await asyncio.wait_for(self.bus.send_many(
                    [(self.config.topics.reports, value, key, None) for value, key in batch]), self.config.deadline_s)
                failed = sum(r is not None for r in results)
            except Exception:
                failed = len(batch)
            if failed:
                self.stats.reports_unpublished += failed
                log.warning("%d session reports not published (is the broker down?)", failed)
            for _ in batch:
                self._reports.task_done()


def _inference(score_many, sessions, layers):
    with torch.inference_mode():
        return score_many(sessions, layers)


class Calibration:
    """Device compute times of the sessions a batched run does not time alone.

    Which sessions are timed alone is a hash of the session id (``share`` of them), so it does not
    depend on how sessions fall into batches. A calibrated session gets the median over its method's
    timed sessions: of the inference time per sample, times its own sample count, and of the
    fine-tuning time.
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self._per_sample: dict[str, list[float]] = {}
        self._finetune: dict[str, list[float]] = {}
        # method -> (per sample, fine-tuning): kept as sessions are timed (few), read for every other session
        self._medians: dict[str, tuple[float, float | None]] = {}

    def measures(self, method: str, session_id: str) -> bool:
        digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.share * 2**64

    def ready(self, method: str) -> bool:
        return method in self._medians

    def add(self, method: str, delay: dict[str, float], samples: int) -> None:
        per_sample = self._per_sample.setdefault(method, [])
        per_sample.append(delay["device_compute_ms"] / max(samples, 1))
        finetune = self._finetune.setdefault(method, [])
        if "finetune_ms" in delay:
            finetune.append(delay["finetune_ms"])
        self._medians[method] = (float(np.median(per_sample)), float(np.median(finetune)) if finetune else None)

    def estimate(self, method: str, samples: int) -> dict[str, float]:
        per_sample, finetune_ms = self._medians[method]
        out = {"device_compute_calibrated_ms": per_sample * samples}
        if finetune_ms is not None:
            out["finetune_calibrated_ms"] = finetune_ms
        return out


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

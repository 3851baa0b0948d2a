"""One device: static layers, current dynamic weights, one session at a time.

For a session the agent gets its dynamic weights by its method:
- ``base``: the global classifier it already holds (no request);
- ``finetune``: the global classifier after k Adam steps on its labelled
  recent samples, computed here and timed;
- ``duet`` / ``duet_no_swa``: a `SessionStart` to the cloud and the
  `WeightsReady` that answers it, awaited with a deadline; on timeout the
  global classifier, and the report says ``fallback``.
Then it scores the session's samples and reports scores and delays.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from duet_bus.checkpoint import Checkpoint
from duet_bus.data.streams import DeviceSession
from duet_bus.models.dynamic import LayerWeights
from duet_bus.protocol import ProtocolError, SessionReport

if TYPE_CHECKING:
    from devices.fleet import Fleet


class DeviceAgent:
    def __init__(self, device_id: str, checkpoint: Checkpoint, fleet: "Fleet", method: str | None = None) -> None:
        self.device_id = device_id
        self.checkpoint = checkpoint  # shared by every agent of this model version
        self.fleet = fleet
        self.method = method or checkpoint.model.config.method
        self.weights: LayerWeights = checkpoint.global_layers

    async def run_session(self, session: DeviceSession) -> SessionReport:
        delay: dict[str, float] = {}
        payload: dict[str, int] = {}
        fallback = False
        if self.method == "base":
            self.weights = self.checkpoint.global_layers
        elif self.method == "finetune":
            self.weights, delay["finetune_ms"] = self.finetune(session)
        else:
            reply = await self.fleet.request(self, session, delay, payload)
            if reply is None:
                fallback = True
                self.weights = self.checkpoint.global_layers
            else:
                self.weights = self.weights_from(reply)
        # In a thread: torch releases the GIL, and the fleet's event loop stays
        # free to take other devices' replies the moment they arrive. One
        # device computes at a time (see `Fleet.compute_lock`).
        async with self.fleet.compute_lock:
            scores, delay["device_compute_ms"] = await asyncio.to_thread(self.score, session)
        return self.report(session, scores, fallback, delay, payload)

    def report(self, session: DeviceSession, scores: np.ndarray, fallback: bool, delay: dict[str, float],
               payload: dict[str, int]) -> SessionReport:
        """What the device reports of a session."""
        return SessionReport(
            session_id=self.fleet.session_id(session), device_id=self.device_id, method=self.method,
            model_version=self.checkpoint.model_version, scores=np.asarray(scores, np.float32),
            labels=np.asarray(session.samples.labels, np.float32).ravel(), fallback=fallback,
            delay_ms=delay, payload_bytes=payload,
        )

    def weights_from(self, reply) -> LayerWeights:
        """The dynamic layers a `WeightsReady` carries."""
        layers = [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in reply.layers]
        # A factored reply is combined with the generator's shared factors this device holds.
        return self.checkpoint.model.head.unfactor(layers) if reply.form == "factored" else layers

    def score(self, session: DeviceSession) -> tuple[np.ndarray, float]:
        """The session's scores with the current weights, and the wall time in ms."""
        start = time.perf_counter()
        with torch.inference_mode():
            scores = self.checkpoint.model.score_samples(session.samples, self.weights)
        return scores, (time.perf_counter() - start) * 1000

    def finetune(self, session: DeviceSession) -> tuple[LayerWeights, float]:
        """The global classifier fine-tuned on the session's labelled recent samples, and the wall time in ms."""
        if session.recent is None or len(session.recent) == 0:
            raise ProtocolError("recent", f"session {session.session_id}: fine-tuning needs labelled recent samples")
        return self.checkpoint.model.finetune(self.checkpoint.global_layers, session.recent, self.fleet.config.finetune)

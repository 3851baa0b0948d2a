"""The batched device side (`Fleet.run_many`) against one device at a time (`Fleet.run`), for both tasks:
the same scores to float rounding, whatever the method and the weight encoding."""

import asyncio

import numpy as np
import pytest
import torch

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus.bus import MemoryBus, Topics
from duet_bus.data.streams import offline_test_sessions


async def _both(checkpoint, sessions, method, encoding="float32", timing_share=0.0, deadline_s=20.0):
    bus = MemoryBus()
    topics = Topics()
    service = GeneratorService(bus, [checkpoint], CloudConfig(topics=topics, weight_encoding=encoding))
    await service.start()
    stop = asyncio.Event()
    server = asyncio.create_task(service.run(stop))
    fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=deadline_s, timing_share=timing_share))
    await fleet.start()
    try:
        agents = [DeviceAgent(s.device_id, checkpoint, fleet, method) for s in sessions]
        alone = [await fleet.run(a, s) for a, s in zip(agents, sessions)]
        batched = await fleet.run_many(agents, sessions)
    finally:
        stop.set()
        await server
        await fleet.stop()
        await service.stop()
    return alone, batched, fleet


def _same(alone, batched):
    assert [a.session_id for a in alone] == [b.session_id for b in batched]
    for a, b in zip(alone, batched):
        assert a.fallback == b.fallback
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        np.testing.assert_array_equal(b.labels, a.labels)


@pytest.mark.parametrize("method, encoding", [("base", "float32"), ("finetune", "float32"),
                                              ("duet", "float32"), ("duet", "factored")])
async def test_recommendation_sessions_score_as_one_device_at_a_time(duet_checkpoint, tiny_shared, method, encoding):
    sessions = offline_test_sessions(tiny_shared, with_recent=5)[:12]
    alone, batched, fleet = await _both(duet_checkpoint, sessions, method, encoding)
    _same(alone, batched)
    # Nothing asked for a share timed alone: the first session is, to calibrate the rest.
    timing = [("device_compute_ms" in r.delay_ms, "device_compute_calibrated_ms" in r.delay_ms) for r in batched]
    assert timing == [(True, False)] + [(False, True)] * (len(sessions) - 1)
    if method == "finetune":
        assert "finetune_ms" in batched[0].delay_ms
        assert all(r.delay_ms["finetune_calibrated_ms"] == batched[1].delay_ms["finetune_calibrated_ms"] > 0
                   for r in batched[1:])


@pytest.mark.parametrize("method, encoding", [("base", "float32"), ("finetune", "float32"), ("duet", "factored")])
async def test_image_sessions_score_as_one_device_at_a_time(vision_checkpoint, fashion_prepared, method, encoding):
    sessions = fashion_prepared.device_sessions(fashion_prepared.split("test")[:8], recent=6)
    alone, batched, _ = await _both(vision_checkpoint, sessions, method, encoding)
    _same(alone, batched)


async def test_fallen_back_sessions_among_answered_ones(duet_checkpoint, tiny_shared):
    """No cloud: every session falls back to the global classifier, batched as alone."""
    sessions = offline_test_sessions(tiny_shared)[:5]
    bus = MemoryBus()
    fleet = Fleet(bus, FleetConfig(deadline_s=0.2, timing_share=1.0))
    await fleet.start()
    agents = [DeviceAgent(s.device_id, duet_checkpoint, fleet) for s in sessions]
    alone = [await fleet.run(a, s) for a, s in zip(agents, sessions)]
    batched = await fleet.run_many(agents, sessions)
    await fleet.stop()
    assert all(r.fallback for r in alone + batched)
    _same(alone, batched)
    assert all("device_compute_ms" in r.delay_ms for r in batched)  # a share of 1 times every session alone


def test_a_calibrated_time_is_the_median_of_the_sessions_timed_so_far():
    from devices.fleet import Calibration

    calibration = Calibration(share=0.1)
    calibration.add("finetune", {"device_compute_ms": 4.0, "finetune_ms": 30.0}, samples=2)
    assert calibration.estimate("finetune", 3) == {"device_compute_calibrated_ms": 6.0, "finetune_calibrated_ms": 30.0}
    calibration.add("finetune", {"device_compute_ms": 8.0, "finetune_ms": 50.0}, samples=2)
    calibration.add("finetune", {"device_compute_ms": 12.0, "finetune_ms": 70.0}, samples=2)
    assert calibration.estimate("finetune", 1) == {"device_compute_calibrated_ms": 4.0, "finetune_calibrated_ms": 50.0}
    calibration.add("base", {"device_compute_ms": 1.0}, samples=4)
    assert calibration.estimate("base", 8) == {"device_compute_calibrated_ms": 2.0}


def test_a_sessions_scores_do_not_keep_the_batch_alive(duet_checkpoint, tiny_shared):
    """Each session's scores are its own array, not a view of the batch's output: a view kept the whole
    batch's tensor, and behind it the batch's freed working memory, alive as long as one session's result."""
    sessions = offline_test_sessions(tiny_shared, with_recent=5)[:6]
    with torch.inference_mode():
        scores = duet_checkpoint.model.score_many([s.samples for s in sessions], duet_checkpoint.global_layers)
    for out, session in zip(scores, sessions):
        owner = out if out.base is None else out.base
        assert owner.flags.owndata and owner.nbytes == out.nbytes == session.samples.targets.size * 4

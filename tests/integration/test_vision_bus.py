"""The image task over the real embedded broker: image and embedding uploads, full and factored heads."""

import asyncio

import numpy as np
import pytest

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus.tasks.vision import predict
from duet_bus.testing import hostile_records


async def serve_sessions(bus, topics, checkpoint, sessions, encoding: str, upload: str, method: str | None = None):
    service = GeneratorService(bus, [checkpoint], CloudConfig(topics=topics, weight_encoding=encoding, max_wait_ms=20))
    await service.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=20, upload=upload))
    await fleet.start()
    try:
        return await asyncio.wait_for(asyncio.gather(
            *(fleet.run(DeviceAgent(s.device_id, checkpoint, fleet, method), s) for s in sessions)), 60), service
    finally:
        await fleet.stop()
        stop.set()
        await asyncio.wait_for(task, 10)
        await service.stop()


@pytest.mark.parametrize("encoding, upload", [("float32", "samples"), ("factored", "embeddings")])
async def test_devices_classify_with_heads_generated_from_their_images(
        kafka_bus, kafka_topics, vision_checkpoint, fashion_prepared, encoding, upload):
    test = fashion_prepared.split("test")
    sessions = fashion_prepared.device_sessions(test)
    reports, service = await serve_sessions(kafka_bus, kafka_topics, vision_checkpoint, sessions, encoding, upload)
    assert not any(r.fallback for r in reports) and service.stats.served == len(sessions)
    # What the devices scored over the bus is what the offline evaluation scores, up to float rounding
    # (the factored head is never formed; the full one is formed by the cloud).
    offline, labels = predict(vision_checkpoint.model, fashion_prepared, test)
    np.testing.assert_allclose(np.stack([r.scores for r in reports]), offline, atol=1e-4)
    assert np.array_equal(np.stack([r.labels for r in reports]), labels)
    sizes = {r.payload_bytes["download"] for r in reports}
    head = sum(i * o + o for i, o in vision_checkpoint.spec.layer_shapes) * 4
    assert max(sizes) < head if encoding == "factored" else min(sizes) > head
    if upload == "embeddings":
        assert all(r.delay_ms["embed_ms"] > 0 for r in reports)  # the device's static layers ran first


async def test_8_bit_pixel_uploads_are_the_float_upload_of_the_quantized_images(vision_checkpoint, fashion_prepared):
    """`devices.upload: images_uint8`: each real-time image goes up as 8-bit pixels, a quarter of the bytes; the
    cloud generates from exactly the image those pixels stand for, so every session scores what a float32 upload
    of the quantized images scores."""
    from dataclasses import replace

    from duet_bus.bus import MemoryBus, Topics

    sessions = fashion_prepared.device_sessions(fashion_prepared.split("test"))[:12]
    pixels, _ = await serve_sessions(MemoryBus(), Topics(), vision_checkpoint, sessions, "float32", "images_uint8")
    quantized = [replace(s, realtime=np.rint(s.realtime * 255.0).astype(np.uint8).astype(np.float32) / 255.0)
                 for s in sessions]
    assert max(np.abs(q.realtime - s.realtime).max() for q, s in zip(quantized, sessions)) <= 0.5 / 255 + 1e-7
    floats, _ = await serve_sessions(MemoryBus(), Topics(), vision_checkpoint, quantized, "float32", "samples")
    assert not any(r.fallback for r in pixels + floats)
    for a, b in zip(pixels, floats):
        np.testing.assert_array_equal(a.scores, b.scores)
        saved = b.payload_bytes["upload"] - a.payload_bytes["upload"]
        assert 0 <= saved - 3 * sessions[0].realtime.size <= 4  # 4 bytes a pixel -> 1 (and the dtype's name)


async def test_a_float16_factor_is_half_the_download_and_scores_what_float32_scores_to_float16s_precision(
        vision_checkpoint, fashion_prepared):
    from duet_bus.bus import MemoryBus, Topics

    sessions = fashion_prepared.device_sessions(fashion_prepared.split("test"))[:12]
    full, _ = await serve_sessions(MemoryBus(), Topics(), vision_checkpoint, sessions, "factored", "samples")
    half, _ = await serve_sessions(MemoryBus(), Topics(), vision_checkpoint, sessions, "factored_float16", "samples")
    assert not any(r.fallback for r in full + half)
    for a, b in zip(full, half):
        assert 0.49 < b.payload_bytes["download"] / a.payload_bytes["download"] < 0.51
        scale = np.abs(a.scores).max()
        np.testing.assert_allclose(b.scores, a.scores, atol=2e-3 * scale)  # float16: 11 bits of mantissa
        assert (b.scores.argmax(1) == a.scores.argmax(1)).mean() >= 0.75


async def test_on_device_fine_tuning_of_the_head_needs_labelled_images(
        kafka_bus, kafka_topics, vision_checkpoint, fashion_prepared):
    sessions = fashion_prepared.device_sessions(fashion_prepared.split("test")[:3], recent=6)
    reports, _ = await serve_sessions(kafka_bus, kafka_topics, vision_checkpoint, sessions, "float32", "samples",
                                      method="finetune")
    assert all(r.delay_ms["finetune_ms"] > 0 and r.scores.shape == (4, 10) for r in reports)


async def test_malformed_image_uploads_go_to_the_dead_letter_topic(vision_checkpoint):
    from duet_bus import protocol
    from duet_bus.bus import MemoryBus

    bus = MemoryBus()
    service = GeneratorService(bus, [vision_checkpoint], CloudConfig())
    await service.start()
    spec = vision_checkpoint.spec
    shape = dict(spec.realtime_kinds)["images"]
    for record in hostile_records(300, seed=4, model_version=spec.model_version, reply_topic="duet.weights",
                                  n_items=1, realtime_len=spec.realtime_len, image_shape=shape):
        await bus.send("duet.sessions", record)
    records = []
    while len(records) < 300:
        records += await service.consumer.getmany(timeout_ms=100, max_records=300)
    await service.handle(records)
    replies = sum(len(part) for part in bus.topics["duet.weights"])
    reasons = [protocol.decode(r.value).reason for part in bus.topics["duet.deadletter"] for r in part]
    assert service.stats.internal_errors == 0
    assert replies + len(reasons) == 300 and replies > 10  # every record answered or dead-lettered
    for expected in ("realtime: contains NaN", "realtime: dtype 'float64' not allowed",
                     "realtime: one sample of images has shape", "realtime_kind: 'pixels' is not one of"):
        assert any(r.startswith(expected) for r in reasons), expected


def test_the_commands_train_describe_serve_and_run_an_image_model(fashion_shared, kafka_bootstrap, tmp_path, capsys):
    """`duet train`, `duet info`, `duet cloud` and `duet devices` as a user runs them, as separate processes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from duet_bus.cli import main

    ckpt = tmp_path / "vision.pt"
    assert main(["train", "--dataset", "fashion-mnist", "--data-path", str(fashion_shared), "--devices", "6",
                 "--max-images", "0", "--width", "0.25", "--epochs", "1", "--method", "duet_np2",
                 "--out", str(ckpt)]) == 0
    assert "best valid_accuracy" in capsys.readouterr().out
    assert main(["info", str(ckpt), "--weight-encoding", "factored"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "image_classification" and info["realtime_kinds"]["images"] == [1, 28, 28]
    duet = [sys.executable, "-m", "duet_bus.cli"]
    cloud = subprocess.Popen([*duet, "cloud", "--bootstrap", kafka_bootstrap, "--checkpoint", str(ckpt),
                              "--weight-encoding", "factored", "--group", f"vision-{os.getpid()}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(cloud.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("partitions of duet.sessions: 0" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        run = subprocess.run([*duet, "devices", "--bootstrap", kafka_bootstrap, "--checkpoint", str(ckpt),
                              "--data-path", str(fashion_shared), "--count", "6", "--upload", "embeddings",
                              "--deadline", "20", "--fleet-id", f"vision-{os.getpid()}"],
                             capture_output=True, text=True, timeout=120)
    finally:
        cloud.send_signal(signal.SIGTERM)
        code = cloud.wait(30)
    assert code == 0, lines
    assert run.returncode == 0, run.stderr
    assert "6 sessions" in run.stdout and "accuracy" in run.stdout and "fallbacks 0" in run.stdout

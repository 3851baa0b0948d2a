"""Camera devices in the runner: their streams, the label-mix and corruption shifts, and the scenario schema."""

import numpy as np
import pytest

from duet_bus.data.images import CORRUPTIONS, ImagePrepConfig, corrupt, gaussian_blur, load_fashion_mnist, prepare_images
from duet_bus.data.streams import ImageStream
from duet_bus.errors import ConfigError
from duet_bus.scenario import ScenarioError, parse_scenario
from duet_bus.shifts import SHIFTS


@pytest.fixture(scope="module")
def held(fashion_shared):
    return prepare_images(load_fashion_mnist(fashion_shared), ImagePrepConfig(devices=6, max_images=0, holdout=0.4),
                          seed=0)


def test_a_camera_device_streams_its_held_out_sessions_and_keeps_its_labelled_log(held):
    device = ImageStream(0, held, owner=2)
    stream = held.sessions[(held.session_device == 2) & (held.session_split == 3)]
    assert len(device.queue) == len(stream) > 0
    rng = np.random.default_rng(0)
    first = device.next_session(rng, recent=5)
    index = stream[0]
    assert np.array_equal(first.realtime, held.images[index[:2]])  # its own pictures, as its camera saw them
    assert np.array_equal(first.samples.images, held.images[index[2:]])
    assert np.array_equal(first.samples.labels, held.labels[index[2:]])
    assert first.realtime_kind == "images" and len(first.recent) == 5
    second = device.next_session(rng, recent=5)
    # Fine-tuning learns from the last labelled pictures, which now include the first session's.
    assert np.array_equal(second.recent.labels[-4:], held.labels[index[2:]])


def test_handover_takes_the_new_owner_pictures_through_the_device_camera(held):
    device = ImageStream(0, held, owner=2)
    SHIFTS["handover"](held, {}).apply(device, np.random.default_rng(0))
    assert device.owner_id != 2 and device.home_id == 2
    index = device.queue[0]
    assert set(held.owner[index]) == {device.owner_id}
    session = device.next_session(np.random.default_rng(0))
    seen = held.cameras[2].apply(held.raw[index])[:, None]
    assert np.allclose(session.realtime, seen[:2]) and not np.allclose(session.realtime, held.images[index[:2]])


def test_label_mix_draws_the_remaining_sessions_from_a_new_class_mix(held):
    device = ImageStream(0, held, owner=1)
    before = np.concatenate([held.labels[s] for s in device.queue])
    SHIFTS["label_mix"](held, {"alpha": 0.05}).apply(device, np.random.default_rng(3))
    after = np.concatenate([held.labels[s] for s in device.queue])
    assert len(after) == len(before)
    stream_images = set(held.sessions[held.split("stream")].ravel().tolist())
    assert set(np.concatenate(device.queue).tolist()) <= stream_images  # never a training picture
    # A concentration of 0.05 puts most of the new sessions on one or two classes.
    assert np.bincount(after, minlength=10).max() / len(after) > 0.5


def test_corruption_damages_every_later_picture_and_stacks(held):
    device = ImageStream(0, held, owner=3)
    clean = held.images[device.queue[0]]
    SHIFTS["corruption"](held, {"type": "brightness", "severity": 2}).apply(device, np.random.default_rng(0))
    SHIFTS["corruption"](held, {"type": "contrast", "severity": 1}).apply(device, np.random.default_rng(0))
    session = device.next_session(np.random.default_rng(0))
    expected = corrupt(corrupt(clean, "brightness", 2, None), "contrast", 1, None)
    assert np.allclose(np.concatenate([session.realtime, session.samples.images]), expected)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_grows_with_its_severity_and_stays_in_range(held, kind):
    images = held.images[:32]
    change = []
    for severity in range(1, 6):
        out = corrupt(images, kind, severity, np.random.default_rng(0))
        assert out.shape == images.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        change.append(float(np.abs(out - images).mean()))
    assert all(a < b for a, b in zip(change, change[1:])), change


def test_blur_keeps_the_mean_of_a_flat_image_and_bad_corruptions_are_named():
    flat = np.full((1, 1, 9, 9), 0.4, np.float32)
    assert np.allclose(gaussian_blur(flat, 1.5), 0.4)
    with pytest.raises(ConfigError, match="unknown kind 'fog'"):
        corrupt(flat, "fog", 1, None)
    with pytest.raises(ConfigError, match="severity must be an integer 1-5"):
        corrupt(flat, "blur", 6, None)


def vision(**extra):
    return {"name": "v", "duration": "1h", "data": {"dataset": "fashion-mnist", **extra.pop("data", {})}, **extra}


def test_a_vision_scenario_takes_the_task_defaults():
    s = parse_scenario(vision())
    assert s.task == "image_classification" and s.backbone == "mobilenetv3_small"
    assert s.prep == ImagePrepConfig(holdout=0.3) and (s.epochs, s.batch_size, s.lr) == (6, 64, 2e-3)
    assert s.eval_config().prep == s.prep


def test_vision_scenario_problems_name_what_belongs_to_which_task():
    with pytest.raises(ScenarioError) as err:
        parse_scenario(vision(
            data={"eval_negatives": 5, "realtime": 6, "session_length": 6},
            model={"backbone": "gru4rec"}, arrivals={"kind": "replay"},
            shifts=[{"kind": "interest_drift", "at": "10m"}, {"kind": "corruption", "at": "20m", "type": "fog",
                                                               "severity": 0}]))
    text = "\n".join(err.value.problems)
    for expected in ("data.eval_negatives: only for recommendation data sets; fashion-mnist is image_classification",
                     "data.realtime: 6 real-time images leave none to classify",
                     "model.backbone: must be one of mobilenetv3_large, mobilenetv3_small",
                     "arrivals.kind: fashion-mnist sessions carry no timestamps to replay",
                     "shifts[0].kind: interest_drift shifts recommendation devices",
                     "shifts[1].type: must be one of brightness", "shifts[1].severity: must be an integer from 1 to 5"):
        assert expected in text, text
    with pytest.raises(ScenarioError, match="data.alpha: only for image_classification data sets"):
        parse_scenario({"name": "r", "duration": "1h", "data": {"alpha": 0.3}})
    with pytest.raises(ScenarioError, match="model.width: only for image backbones"):
        parse_scenario({"name": "r", "duration": "1h", "model": {"width": 0.5}})
    with pytest.raises(ScenarioError, match="ck\\+ is not bundled"):
        parse_scenario(vision(data={"dataset": "ck+"}))

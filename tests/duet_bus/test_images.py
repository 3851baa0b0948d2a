"""The vision task's data and backbone: idx files, device partitions, cameras, MobileNetV3."""

import numpy as np
import pytest
import torch

from duet_bus.data.images import (Camera, dirichlet_partition, fashion_mnist_folder, load_fashion_mnist, read_idx,
                                  rotate)
from duet_bus.errors import DataError
from duet_bus.models.mobilenetv3 import MobileNetConfig, MobileNetV3
from duet_bus.testing import write_fashion, write_idx


def test_idx_files_gzip_or_not(tmp_path):
    write_fashion(tmp_path)
    data = load_fashion_mnist(tmp_path)
    assert data.train_images.shape == (30, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_labels.tolist() == list(range(10)) and data.train_labels.dtype == np.int64
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    write_idx(tmp_path / "ints", big_endian)
    assert read_idx(tmp_path / "ints").tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x89PNG" + raw[4:], "not an idx file"),
    (lambda raw: raw[:-5], "bytes, but the header's shape"),
    (lambda raw: raw[:6], "header cut short"),
    (lambda raw: b"", "not an idx file"),
])
def test_broken_idx_files_are_named(tmp_path, damage, message):
    write_fashion(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"train-labels-idx1-ubyte: .*{message}"):
        load_fashion_mnist(tmp_path)


def test_missing_folder_and_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fashion_mnist_folder(tmp_path / "nowhere")
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[.gz\] is missing"):
        load_fashion_mnist(tmp_path)


def test_dirichlet_partition_covers_every_sample_once_and_skews_labels():
    labels = np.repeat(np.arange(10), 300)
    parts = dirichlet_partition(labels, 20, 0.3, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    again = dirichlet_partition(labels, 20, 0.3, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    # With alpha 0.3 a device's most common class holds far more than the uniform 10 %.
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p) > 50]
    assert np.median(top_share) > 0.3
    flat = dirichlet_partition(labels, 20, 1000.0, np.random.default_rng(0))
    assert max(np.bincount(labels[p], minlength=10).max() / len(p) for p in flat) < 0.2


def test_camera_and_rotation():
    images = np.zeros((1, 5, 5), np.uint8)
    images[0, 0, 2] = 255  # top middle
    turned = rotate(images.astype(np.float32) / 255, 90)
    assert np.allclose(turned[0], np.rot90(images[0].astype(np.float32) / 255, k=-1), atol=1e-5)
    assert np.allclose(Camera().apply(images), images / 255.0)
    camera = Camera.random(np.random.default_rng(1))
    seen = camera.apply(np.full((2, 28, 28), 128, np.uint8))
    assert seen.dtype == np.float32 and 0 <= seen.min() <= seen.max() <= 1
    assert Camera.random(np.random.default_rng(1), strength=0) == Camera()


@pytest.mark.parametrize("variant, params", [("mobilenetv3_large", 5_483_032), ("mobilenetv3_small", 2_542_856)])
def test_mobilenetv3_is_the_published_architecture(variant, params):
    """At 224x224 RGB, width 1, 1,000 classes: the reference implementation's parameter count."""
    net = MobileNetV3(MobileNetConfig(variant, in_channels=3, small_input=False))
    head = net.dynamic_shapes(1000)
    assert sum(p.numel() for p in net.parameters()) + sum(i * o + o for i, o in head) == params
    net.eval()
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, net.feature_dim)


@pytest.mark.parametrize("variant, feature, hidden", [("mobilenetv3_large", 960, 1280), ("mobilenetv3_small", 576, 1024)])
def test_mobilenetv3_on_28x28_grey_images(variant, feature, hidden):
    net = MobileNetV3(MobileNetConfig(variant, in_channels=1, small_input=True)).eval()
    with torch.no_grad():
        assert net.features(torch.zeros(2, 1, 28, 28)).shape[2:] == (4, 4)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, feature)
    assert net.dynamic_shapes(10) == ((feature, hidden), (hidden, 10))


def test_the_real_fashion_mnist_when_installed():
    try:
        data = load_fashion_mnist()
    except DataError as exc:
        pytest.skip(f"Fashion-MNIST is not installed here ({exc}); `make fashion-mnist` extracts it")
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


@pytest.mark.parametrize("n_generators", [None, 1, 3])
def test_vision_model_generates_a_head_per_session(n_generators):
    from duet_bus.models import PPGConfig
    from duet_bus.models.vision import VisionConfig, VisionModel

    torch.manual_seed(0)
    ppg = None if n_generators is None else PPGConfig(n_generators=n_generators)
    model = VisionModel(VisionConfig(MobileNetConfig("mobilenetv3_small", width=0.5), n_classes=10, ppg=ppg)).eval()
    realtime = torch.rand(5, 2, 1, 28, 28)
    lengths = torch.tensor([1, 2, 2, 1, 2])
    images = torch.rand(5, 3, 1, 28, 28)
    with torch.no_grad():
        weights = model.weights_for(realtime, lengths)
        logits = model.score(images, weights)
        assert logits.shape == (5, 3, 10)
        if n_generators is None:
            assert weights[0][0].shape == model.dynamic_shapes[0]
            return
        assert [tuple(w.shape) for w, _ in weights] == [(5, *s) for s in model.dynamic_shapes]
        chunked = model.weights_for(realtime, lengths, chunk=2)
        for (w, b), (cw, cb) in zip(weights, chunked):
            torch.testing.assert_close(w, cw)
            torch.testing.assert_close(b, cb)
        # Padding beyond a session's real-time length does not change its head.
        padded = realtime.clone()
        padded[0, 1] = 1.0
        torch.testing.assert_close(model.weights_for(padded, lengths)[0][0][0], weights[0][0][0])

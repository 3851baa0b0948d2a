"""Images for the vision task: idx files (Fashion-MNIST) and devices made from them.

Fashion-MNIST has no person id, so devices are made as federated-learning
benchmarks make them: a seeded Dirichlet label-skew partition (concentration
``alpha``; small alpha, few classes per device) and, optionally, a fixed
per-device "camera" (brightness, contrast, small rotation) so devices also
differ in how their images look.

The four standard idx files (``train-images-idx3-ubyte[.gz]`` and so on) are
read from a folder: ``$DUET_FASHION_MNIST``, or Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or any
folder given. ``make fashion-mnist`` extracts the Debian package into the
project's cache where it is not installed.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duet_bus.errors import ConfigError, DataError

FASHION_MNIST_ENV = "DUET_FASHION_MNIST"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """One idx file (gzip or not) as an array; `DataError` naming the file if it is not one."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but the header's shape {shape} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class ImageSet:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` int64, for the train and test parts."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def fashion_mnist_folder(path: str | Path | None = None) -> Path:
    """Where the idx files are: the path given, ``$DUET_FASHION_MNIST``, or Debian's folder."""
    folder = Path(path or os.environ.get(FASHION_MNIST_ENV) or DEBIAN_FOLDER)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{folder}: no Fashion-MNIST folder; install Debian's dataset-fashion-mnist (or run "
                        f"`make fashion-mnist`), or give --data-path / ${FASHION_MNIST_ENV} pointing at the four "
                        f"idx files")
    return folder


def load_fashion_mnist(path: str | Path | None = None) -> ImageSet:
    folder = fashion_mnist_folder(path)

    def part(stem: str) -> np.ndarray:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return read_idx(folder / name)
        raise DataError(f"{folder}: {stem}[.gz] is missing")

    out = []
    for split in ("train", "t10k"):
        images, labels = part(f"{split}-images-idx3-ubyte"), part(f"{split}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
            raise DataError(f"{folder}: {split} labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        out += [images.astype(np.uint8), labels.astype(np.int64)]
    return ImageSet(*out, classes=FASHION_MNIST_CLASSES)


def dirichlet_partition(labels: np.ndarray, n_devices: int, alpha: float,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Split sample indices over devices, each class by ``Dirichlet(alpha)`` shares.

    Every sample goes to exactly one device; each device's indices are sorted.
    Small ``alpha`` gives each device few classes (0.3 is the usual label skew).
    """
    if n_devices < 1:
        raise DataError(f"devices: must be a positive count, got {n_devices}")
    if not alpha > 0:
        raise DataError(f"alpha: must be positive, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclass(frozen=True)
class Camera:
    """A device's fixed way of seeing: brightness offset, contrast factor, rotation (degrees)."""

    brightness: float = 0.0
    contrast: float = 1.0
    rotation: float = 0.0

    @staticmethod
    def random(rng: np.random.Generator, strength: float = 1.0) -> "Camera":
        """A seeded camera; ``strength`` 0 is the identity, 1 the default spread."""
        return Camera(brightness=float(rng.uniform(-0.15, 0.15) * strength),
                      contrast=float(1 + rng.uniform(-0.3, 0.3) * strength),
                      rotation=float(rng.uniform(-10, 10) * strength))

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` uint8 -> float32 in [0, 1], as this camera sees them."""
        x = images.astype(np.float32) / 255.0
        if self.rotation:
            x = rotate(x, self.rotation)
        mean = x.mean(axis=(1, 2), keepdims=True)
        return np.clip((x - mean) * self.contrast + mean + self.brightness, 0.0, 1.0)


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``(N, H, W)`` float images about their centre (bilinear, zero outside)."""
    n, h, w = images.shape
    theta = np.deg2rad(degrees)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    # Where each output pixel comes from: the inverse rotation.
    sy = np.cos(theta) * (ys - cy) - np.sin(theta) * (xs - cx) + cy
    sx = np.sin(theta) * (ys - cy) + np.cos(theta) * (xs - cx) + cx
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    out = np.zeros_like(images)
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                           (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out[:, inside] += images[:, yy[inside], xx[inside]] * weight[inside]
    return out


# Corruptions at severities 1-5, in the spirit of ImageNet-C (Hendrycks & Dietterich, 2019), with
# levels scaled for small grey images: the parameter of each kind at each severity.
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "contrast": (0.75, 0.6, 0.45, 0.3, 0.15),  # factor on the distance from the image's mean
    "noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # standard deviation of Gaussian noise
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),  # Gaussian blur sigma, pixels
    "rotation": (10.0, 20.0, 30.0, 45.0, 60.0),  # degrees
}


def corrupt(images: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``(N, C, H, W)`` float images in [0, 1] corrupted by ``kind`` at ``severity`` 1-5, still in [0, 1]."""
    if kind not in CORRUPTIONS:
        raise ConfigError(f"corruption: unknown kind {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ConfigError(f"corruption: severity must be an integer 1-5, got {severity!r}")
    level = CORRUPTIONS[kind][severity - 1]
    x = images.astype(np.float32)
    if kind == "brightness":
        x = x + level
    elif kind == "contrast":
        mean = x.mean(axis=(2, 3), keepdims=True)
        x = (x - mean) * level + mean
    elif kind == "noise":
        x = x + rng.normal(0.0, level, x.shape).astype(np.float32)
    elif kind == "blur":
        x = gaussian_blur(x, level)
    else:
        n, c, h, w = x.shape
        x = rotate(x.reshape(n * c, h, w), level).reshape(n, c, h, w)
    return np.clip(x, 0.0, 1.0)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(..., H, W)`` images (edges reflected)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = images
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(k, k + size), axis=axis) for k, t in enumerate(taps))
    return out.astype(images.dtype)


# -- devices and sessions ------------------------------------------------------------------------

@dataclass
class ImageSamples:
    """The images a device classifies in one session (or learns from, for fine-tuning), with their labels."""

    images: np.ndarray  # (K, C, H, W) float32
    labels: np.ndarray  # (K,) int64 class ids

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: list["ImageSamples"]) -> "ImageSamples":
        return ImageSamples(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


SPLITS = ("train", "valid", "test", "stream")


@dataclass(frozen=True)
class ImagePrepConfig:
    """How images become devices and sessions (every number is a default of `duet evaluate`).

    A session is ``session_length`` images of one device in order; its first
    ``realtime`` images are the real-time samples the device uploads
    (unlabelled on the device), the rest are the images it classifies. Each
    device's sessions are split in time order: ``train`` / ``valid`` /
    ``test`` for the offline evaluation and the last ``holdout`` fraction as
    the stream `duet run` plays (never seen in training).
    """

    devices: int = 100
    alpha: float = 0.3  # Dirichlet concentration of the label-skew partition
    camera: float = 1.0  # strength of each device's fixed camera; 0: every device sees the same way
    session_length: int = 6
    realtime: int = 2
    valid: float = 0.1
    test: float = 0.1
    holdout: float = 0.2
    max_images: int = 20_000  # a seeded subset of the 70,000 images (0: all), for speed
    image_size: int = 224  # CK+ frames are resized to image_size x image_size (Fashion-MNIST stays 28x28)

    def __post_init__(self) -> None:
        for name in ("devices", "session_length", "realtime"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name}: must be a positive integer, got {value!r}")
        if self.realtime >= self.session_length:
            raise ConfigError(f"data.realtime: {self.realtime} real-time images leave none to classify in a "
                              f"session of {self.session_length}")
        if not self.alpha > 0:
            raise ConfigError(f"data.alpha: must be positive, got {self.alpha!r}")
        if not self.camera >= 0:
            raise ConfigError(f"data.camera: must be non-negative, got {self.camera!r}")
        for name in ("valid", "test", "holdout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be in [0, 1), got {getattr(self, name)!r}")
        if self.valid + self.test + self.holdout >= 1:
            raise ConfigError("data.valid + data.test + data.holdout: must leave sessions to train on")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 1024:
            raise ConfigError(f"data.image_size: must be an integer in 16..1024, got {self.image_size!r}")
        if not isinstance(self.max_images, int) or self.max_images < 0:
            raise ConfigError(f"data.max_images: must be a non-negative integer, got {self.max_images!r}")


@dataclass
class PreparedImages:
    """Devices, their images as their cameras see them, and their sessions split in time order."""

    name: str
    config: ImagePrepConfig
    classes: tuple[str, ...]
    images: np.ndarray  # (N, 1, H, W) float32 in [0, 1], after each owner's camera
    labels: np.ndarray  # (N,) int64
    owner: np.ndarray  # (N,) the device each image belongs to
    cameras: list[Camera]
    sessions: np.ndarray  # (S, session_length) image indices, a device's images in order
    session_device: np.ndarray  # (S,)
    session_split: np.ndarray  # (S,) index into SPLITS
    source: str
    raw: np.ndarray | None = None  # (N, H, W) uint8 before any camera; None where images are already final

    def render(self, index: np.ndarray, camera: int) -> np.ndarray:
        """Images ``(n, C, H, W)`` as device ``camera`` would take them: its own images are what it saw;
        another device's pictures are re-taken through this camera (a shift that changes what a device
        photographs keeps how it photographs)."""
        if self.raw is None or not self.cameras:
            return self.images[index]
        return self.cameras[camera].apply(self.raw[index])[:, None]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def split(self, name: str) -> np.ndarray:
        """Session indices of one split, device by device, each device's in time order."""
        return np.flatnonzero(self.session_split == SPLITS.index(name))

    def recent_labelled(self, session: int, count: int) -> np.ndarray:
        """Image indices of the ``count`` labelled images the device saw last before ``session``."""
        device = self.session_device[session]
        earlier = self.sessions[(self.session_device == device) & (np.arange(len(self.sessions)) < session)]
        return earlier.ravel()[-count:]

    def device_sessions(self, sessions: np.ndarray, recent: int = 0) -> list:
        """Sessions as a device sees them: its real-time images to upload, the images to classify, and
        (``recent`` > 0) its last labelled images for fine-tuning."""
        from duet_bus.data.streams import DeviceSession

        realtime = self.config.realtime
        out = []
        for s in sessions:
            index = self.sessions[s]
            device = f"{self.name}-d{int(self.session_device[s]):04d}"
            labelled = self.recent_labelled(int(s), recent) if recent else None
            out.append(DeviceSession(
                session_id=f"{device}-s{int(s)}", device_id=device, realtime=self.images[index[:realtime]],
                samples=ImageSamples(self.images[index[realtime:]], self.labels[index[realtime:]]),
                recent=None if labelled is None else ImageSamples(self.images[labelled], self.labels[labelled]),
                realtime_kind="images",
            ))
        return out


def prepare_images(data: ImageSet, config: ImagePrepConfig, seed: int, name: str = "fashion-mnist"
                   ) -> PreparedImages:
    """Seeded devices (label-skew partition + camera) and their sessions from an image set."""
    rng = np.random.default_rng([seed, 7])
    images = np.concatenate([data.train_images, data.test_images])
    labels = np.concatenate([data.train_labels, data.test_labels])
    if config.max_images and config.max_images < len(images):
        keep = np.sort(rng.choice(len(images), config.max_images, replace=False))
        images, labels = images[keep], labels[keep]
    parts = dirichlet_partition(labels, config.devices, config.alpha, rng)
    owner = np.empty(len(labels), np.int64)
    cameras = [Camera.random(rng, config.camera) if config.camera else Camera() for _ in parts]
    seen = np.empty((len(labels), 1, *images.shape[1:]), np.float32)
    sessions, session_device, session_split = [], [], []
    length = config.session_length
    for device, members in enumerate(parts):
        owner[members] = device
        seen[members, 0] = cameras[device].apply(images[members])
        order = rng.permutation(members)  # the order the device takes its pictures in
        count = len(order) // length
        if count == 0:
            continue
        sessions.append(order[: count * length].reshape(count, length))
        session_device.append(np.full(count, device))
        session_split.append(_time_splits(count, config))
    if not sessions:
        raise DataError(f"{name}: no device has {length} images for one session; use fewer devices or "
                        f"more images")
    return PreparedImages(name, config, data.classes, seen, labels, owner, cameras,
                          np.concatenate(sessions), np.concatenate(session_device), np.concatenate(session_split),
                          source=name, raw=images)


def _time_splits(count: int, config: ImagePrepConfig) -> np.ndarray:
    """Split codes of a device's ``count`` sessions in time order: train, valid, test, stream."""
    stream = int(round(count * config.holdout))
    test = int(round(count * config.test))
    valid = int(round(count * config.valid))
    train = max(0, count - stream - test - valid)
    return np.repeat(np.arange(len(SPLITS)), [train, valid, test, stream])[:count]

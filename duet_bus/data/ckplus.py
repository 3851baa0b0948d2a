"""CK+ (the extended Cohn-Kanade set) by path, with the paper's protocol (4.1.1).

CK+ cannot be shipped or downloaded here (its licence forbids it); a user who
has it points ``--data-path`` at the folder that holds ``cohn-kanade-images/``
and ``Emotion/`` as distributed:

    cohn-kanade-images/S005/001/S005_001_00000001.png ... S005_001_00000011.png
    Emotion/S005/001/S005_001_00000011_emotion.txt      ("   3.0000000e+00")

Every video with an emotion label is a session; its first three frames are
labelled neutral and its last three frames the video's emotion (0 neutral,
1 anger, 2 contempt, 3 disgust, 4 fear, 5 happiness, 6 sadness, 7 surprise);
a person (``S005``) is a device, and a device's videos, in the order of their
numbers, are its sessions in time. A person has about three labelled
videos, too few to split each person's videos in time as Fashion-MNIST's
devices are, so the videos are split at random (seeded) over all people
into train / valid / test / stream by the configured fractions. The first ``realtime`` frames of a session
are its real-time samples (the paper uses the first frame). Frames are read
as grey images and resized to ``image_size`` (the paper's MobileNetV3 takes
224x224).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duet_bus.data.images import ImagePrepConfig, PreparedImages, _time_splits
from duet_bus.errors import DataError

CKPLUS_CLASSES = ("neutral", "anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise")
FRAMES = 3  # first and last frames kept per video


def _emotion(path: Path) -> int:
    try:
        value = float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: not a CK+ emotion file (one number 1-7 expected)") from exc
    if value != int(value) or not 1 <= value < len(CKPLUS_CLASSES):
        raise DataError(f"{path}: emotion {value:g} is not one of 1..{len(CKPLUS_CLASSES) - 1}")
    return int(value)


def _frame(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
    return np.asarray(grey, np.float32) / 255.0


def prepare_ckplus(folder: str | Path | None, config: ImagePrepConfig, seed: int) -> PreparedImages:
    """CK+ sessions (6 frames each: 3 neutral, 3 of the emotion) split per person in video order."""
    if config.session_length != 2 * FRAMES:
        raise DataError(f"ck+: a session is a video's first and last {FRAMES} frames; data.session_length must be "
                        f"{2 * FRAMES}, got {config.session_length}")
    if folder is None:
        raise DataError("ck+: CK+ is not bundled (its licence forbids it); give --data-path, the folder with "
                        "cohn-kanade-images/ and Emotion/")
    root = Path(folder)
    images_root, emotions_root = root / "cohn-kanade-images", root / "Emotion"
    if not images_root.is_dir() or not emotions_root.is_dir():
        raise DataError(f"{root}: not a CK+ folder (cohn-kanade-images/ and Emotion/ expected)")
    frames, labels, owner, sessions, session_device = [], [], [], [], []
    people = sorted(p.name for p in emotions_root.iterdir() if p.is_dir())
    for device, person in enumerate(people):
        videos = []
        for video in sorted(p for p in (emotions_root / person).iterdir() if p.is_dir()):
            found = sorted(video.glob("*_emotion.txt"))
            if not found:
                continue  # an unlabelled video: not a session (the paper keeps the 327 labelled ones)
            pngs = sorted((images_root / person / video.name).glob("*.png"))
            if len(pngs) < 2 * FRAMES:
                raise DataError(f"{images_root / person / video.name}: {len(pngs)} frames, a session needs "
                                f"{2 * FRAMES}")
            videos.append((pngs[:FRAMES] + pngs[-FRAMES:], _emotion(found[0])))
        for pngs, emotion in videos:
            start = len(frames)
            frames += [_frame(p, config.image_size) for p in pngs]
            labels += [0] * FRAMES + [emotion] * FRAMES
            owner += [device] * len(pngs)
            sessions.append(np.arange(start, len(frames)))
        session_device += [device] * len(videos)
    if not sessions:
        raise DataError(f"{root}: no labelled video found under Emotion/")
    split = np.empty(len(sessions), np.int64)
    split[np.random.default_rng([seed, 11]).permutation(len(sessions))] = np.sort(_time_splits(len(sessions), config))
    return PreparedImages(
        name="ck+", config=config, classes=CKPLUS_CLASSES, images=np.stack(frames)[:, None],
        labels=np.array(labels, np.int64), owner=np.array(owner, np.int64), cameras=[],
        sessions=np.stack(sessions), session_device=np.array(session_device, np.int64),
        session_split=split, source=f"CK+ ({len(people)} people, {len(sessions)} videos)")

"""Video files decoded to frames with PyAV (the ``video`` extra): each frame as an RGB PIL image
with its time in seconds, optionally thinned to ``fps`` frames per second. PyAV, because the
pinned torchvision (0.29) has no video reader left; bench/video.py measures its decoding speed
(one thread and frame threads) beside the model's: decoding is not the bottleneck.

A file that is not a readable video raises :class:`~resfit.core.errors.DataError` naming it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from ..core.atomic import atomic_csv, atomic_path
from ..core.errors import DataError
from .paths import display_path
from .samples import split_of

__all__ = ["PIP_VIDEO", "VIDEO_SUFFIXES", "extract_frames", "is_video", "read_frames"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PIP_VIDEO = "pip install 'resfit[video]'"


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise DataError(f"reading videos needs PyAV: {PIP_VIDEO}") from None
    return av


def read_frames(
    path: str | os.PathLike | BinaryIO, fps: float | None = None, max_seconds: float | None = None
) -> Iterator[tuple[float, Image.Image]]:
    """(time in seconds, RGB frame) of the first video stream, every frame or about ``fps``
    a second (the first frame at or after each tick); stops past ``max_seconds``."""
    av = _av()
    where = "the video" if hasattr(path, "read") else display_path(path)
    if fps is not None and not fps > 0:
        raise DataError(f"--fps must be above 0, not {fps}")
    try:
        container = av.open(path if hasattr(path, "read") else str(path))  # a file or its bytes
    except Exception as e:  # PyAV raises its own error types for anything unreadable
        raise DataError(f"{where} is not a readable video: {str(e).splitlines()[0]}") from None
    with container:
        if not container.streams.video:
            raise DataError(f"{where} has no video stream")
        stream = container.streams.video[0]
        # PyAV's default threading: frame threads measured 0.87x here (bench/video.py), and
        # decoding is about 28x faster than a ResNet-18 either way.
        next_tick = 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time if frame.time is not None else 0.0)
                if max_seconds is not None and t > max_seconds:
                    return
                if fps is not None and t + 1e-6 < next_tick:
                    continue
                next_tick = t + 1.0 / fps if fps else 0.0
                yield t, frame.to_image()
        except av.error.FFmpegError as e:
            raise DataError(
                f"{where}: the video does not decode: {str(e).splitlines()[0]}"
            ) from None


def extract_frames(data: str | os.PathLike, out: str | os.PathLike, fps: float) -> Path:
    """Frames of a folder of labelled videos (``DATA/<class>/*.mp4``, or
    ``DATA/<split>/<class>/*.mp4``) as JPEGs under ``out``, ``fps`` a second, and a manifest
    ``out/frames.csv`` (``path,label,split,group``) whose group is the video: its frames stay
    in one split when val is carved (see :mod:`resfit.data.groups`). Returns the manifest."""
    root, out = Path(data), Path(out)
    videos = sorted(p for p in root.rglob("*") if p.is_file() and is_video(p))
    if not videos:
        raise DataError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {display_path(root)}")
    rows = []
    for video in videos:
        label, parent = video.parent.name, video.parent.parent
        split = split_of(parent.name) if parent != root else ""
        rel = video.relative_to(root)
        folder = out / rel.parent
        folder.mkdir(parents=True, exist_ok=True)
        for k, (_, img) in enumerate(read_frames(video, fps)):
            frame = folder / f"{video.stem}-{k:05d}.jpg"
            with atomic_path(frame) as tmp:
                img.save(tmp, "JPEG", quality=95)
            # Relative to the manifest's folder, which is how manifests are read back.
            rows.append([str(frame.relative_to(out)), label, split or "", str(rel)])
    manifest = out / "frames.csv"
    with atomic_csv(manifest) as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "group"])
        w.writerows(rows)
    return manifest

"""Video files decoded to frames with PyAV (the ``video`` extra): each frame as an RGB PIL image
with its time in seconds, optionally thinned to ``fps`` frames per second. bench/video.py
measured PyAV against torchvision's video reader (see there); PyAV is the one kept.

A file that is not a readable video raises :class:`~resfit.core.errors.DataError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ..core.errors import DataError
from .paths import display_path

__all__ = ["PIP_VIDEO", "VIDEO_SUFFIXES", "is_video", "read_frames"]

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
    path: str | os.PathLike, fps: float | None = None, max_seconds: float | None = None
) -> Iterator[tuple[float, Image.Image]]:
    """(time in seconds, RGB frame) of the first video stream, every frame or about ``fps``
    a second (the first frame at or after each tick); stops past ``max_seconds``."""
    av = _av()
    where = display_path(path)
    if fps is not None and not fps > 0:
        raise DataError(f"--fps must be above 0, not {fps}")
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises its own error types for anything unreadable
        raise DataError(f"{where} is not a readable video: {str(e).splitlines()[0]}") from None
    with container:
        if not container.streams.video:
            raise DataError(f"{where} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: decoding keeps pace with the model
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

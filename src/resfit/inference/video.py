"""Videos through a run: frames decoded (:mod:`resfit.data.video`), classified in batches, and
the per-frame answers turned into events (``start,end,label,mean_confidence``) after temporal
smoothing with hysteresis, so a one-frame flicker of the per-frame labels is not an event.

Smoothing: each class's probability is averaged over a centred window of ``smooth`` seconds;
the current label then changes only when another class's smoothed probability exceeds it by
:data:`HYSTERESIS` (a class hovering at the boundary does not toggle the label every frame).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.atomic import atomic_write_text
from ..data.datasets import DecodedImages
from ..data.decode import resize_shorter, to_tensor
from ..data.video import read_frames

__all__ = ["HYSTERESIS", "VideoResult", "events", "predict_video", "smooth"]

HYSTERESIS = 0.2  # how far another class's smoothed probability must lead to change the label


@dataclass
class VideoResult:
    """A video's answers: frame times (s), calibrated probabilities (frames x classes), the
    raw per-frame labels, the smoothed labels and the events."""

    path: str
    classes: list[str]
    times: np.ndarray
    probs: np.ndarray
    smoothed: list[int]
    events: list[dict]

    def frames_csv(self) -> str:
        """``time,label,confidence,smoothed_label``: one row per classified frame."""
        f = io.StringIO()
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "time", "label", "confidence", "smoothed_label"])
        for t, p, s in zip(self.times, self.probs, self.smoothed, strict=True):
            j = int(p.argmax())
            w.writerow([self.path, f"{t:.3f}", self.classes[j], f"{p[j]:.6f}", self.classes[s]])
        return f.getvalue()

    def events_csv(self) -> str:
        f = io.StringIO()
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "start", "end", "label", "mean_confidence"])
        for e in self.events:
            w.writerow([self.path, f"{e['start']:.3f}", f"{e['end']:.3f}", e["label"],
                        f"{e['mean_confidence']:.6f}"])  # fmt: skip
        return f.getvalue()


def smooth(times: np.ndarray, probs: np.ndarray, seconds: float) -> list[int]:
    """The label of each frame after a centred moving average of ``seconds`` and hysteresis
    (:data:`HYSTERESIS`); ``seconds=0``: the per-frame argmax."""
    if len(times) == 0:
        return []
    if seconds > 0:
        csum = np.vstack([np.zeros((1, probs.shape[1])), np.cumsum(probs, 0)])
        lo = np.searchsorted(times, times - seconds / 2, "left")
        hi = np.searchsorted(times, times + seconds / 2, "right")
        avg = (csum[hi] - csum[lo]) / (hi - lo)[:, None]
    else:
        return [int(j) for j in probs.argmax(1)]
    current, out = int(avg[0].argmax()), []
    for row in avg:
        best = int(row.argmax())
        if best != current and row[best] - row[current] > HYSTERESIS:
            current = best
        out.append(current)
    return out


def events(times: np.ndarray, probs: np.ndarray, labels: Sequence[int], classes) -> list[dict]:
    """Runs of one label as events: start (the first frame's time), end (the next run's start,
    or the last frame's time plus one frame), label and the run's mean probability of it."""
    out: list[dict] = []
    step = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    start = 0
    for i in range(1, len(labels) + 1):
        if i < len(labels) and labels[i] == labels[start]:
            continue
        end = float(times[i]) if i < len(labels) else float(times[-1]) + step
        c = labels[start]
        out.append({"start": float(times[start]), "end": end, "label": classes[c],
                    "mean_confidence": float(probs[start:i, c].mean())})  # fmt: skip
        start = i
    return out


def _batches(frames: Iterable[tuple[float, Image.Image]], base_size: int, batch_size: int):
    """(times, decoded frames) of at most ``batch_size`` frames: uint8 tensors at the run's
    decode size, as :meth:`Predictor.decode` gives images (a clip never sits whole in memory)."""
    times, batch = [], []
    for t, img in frames:
        times.append(t)
        batch.append(to_tensor(resize_shorter(img, base_size)))
        if len(batch) == batch_size:
            yield times, batch
            times, batch = [], []
    if batch:
        yield times, batch


def predict_video(
    predictor,
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    smooth_seconds: float = 1.0,
    batch_size: int = 64,
    max_seconds: float | None = None,
) -> VideoResult:
    """Classify a video's frames (every frame, or ``fps`` a second) with a
    :class:`~resfit.inference.predictor.Predictor` and find its events. The frames go through
    the Predictor's own batch path (:meth:`~resfit.inference.predictor.Predictor.logits`): its
    preprocessing, engine, test-time augmentation and temperature, as images do."""
    times, logits = [], []
    for t, frames in _batches(read_frames(path, fps, max_seconds), predictor.base_size,
                              batch_size):  # fmt: skip
        times += t
        n = len(frames)
        decoded = DecodedImages(frames, torch.full((n,), -1), [Path(str(path))] * n, [],
                                predictor.base_size)  # fmt: skip
        logits.append(predictor.logits(decoded, batch_size=n))
    classes = list(predictor.classes)
    all_logits = torch.cat(logits) if logits else torch.empty(0, len(classes))
    probs = predictor.probabilities(all_logits).numpy()
    times_a = np.asarray(times, dtype=np.float64)
    labels = smooth(times_a, probs, smooth_seconds)
    return VideoResult(str(path), classes, times_a, probs, labels,
                       events(times_a, probs, labels, classes))  # fmt: skip


def write_video_result(res: VideoResult, out: str | os.PathLike) -> tuple[str, str]:
    """``out`` (the per-frame CSV) and ``<out stem>.events.csv`` beside it."""
    out = os.fspath(out)
    stem = out[:-4] if out.lower().endswith(".csv") else out
    events_path = stem + ".events.csv"
    atomic_write_text(out, res.frames_csv())
    atomic_write_text(events_path, res.events_csv())
    return out, events_path

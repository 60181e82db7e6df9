"""Metrics per group (``--slice-by``): a model can be good on average and poor on one scanner,
one hospital or one camera. Each group of images that share a value of a manifest column or a
DICOM tag gets its size, accuracy, recall per class and calibration (ECE at the run's
temperature), and a warning where it is too small to trust.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_csv
from ..tasks.calibration import expected_calibration_error

__all__ = ["SLICES_CSV", "SMALL_SLICE", "slice_lines", "slice_metrics", "write_slices"]

SLICES_CSV = "slices.csv"  # in each evaluated split's folder (RUN/eval-NAME/)

# Below this many images a slice's accuracy has a 95% interval wider than about +/-18 points.
SMALL_SLICE = 30


def slice_metrics(
    values: Sequence[str], y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> list[dict]:
    """One dict per slice value (largest first): ``slice``, ``n``, ``accuracy``, ``recall``
    (class -> recall, for the classes present in the slice), ``ece`` and ``small`` (fewer
    than :data:`SMALL_SLICE` images). An image with no value is in the slice ``""``."""
    values = np.asarray([v or "" for v in values], dtype=object)
    pred = probs.argmax(1)
    out = []
    for v in sorted(set(values), key=lambda v: (-int((values == v).sum()), v)):
        m = values == v
        y, p = y_true[m], pred[m]
        recall = {classes[c]: float((p[y == c] == c).mean()) for c in sorted(set(y.tolist()))}
        out.append({
            "slice": v,
            "n": int(m.sum()),
            "accuracy": float((p == y).mean()),
            "recall": recall,
            "ece": float(expected_calibration_error(probs[m], y)),
            "small": bool(m.sum() < SMALL_SLICE),
        })  # fmt: skip
    return out


def slice_lines(column: str, slices: Sequence[dict]) -> list[str]:
    """What ``resfit eval`` prints per slice, a warning on the small ones."""
    lines = [f"per {column}:"]
    for s in slices:
        warn = f"  (fewer than {SMALL_SLICE} images: too few to trust)" if s["small"] else ""
        recall = " ".join(f"{c} {r:.3f}" for c, r in s["recall"].items())
        lines.append(f"  {s['slice'] or '(none)':20s} accuracy {s['accuracy']:.4f} "
                     f"ECE {s['ece']:.4f} n={s['n']}  recall: {recall}{warn}")  # fmt: skip
    return lines


def write_slices(path: str | os.PathLike, column: str, slices: Sequence[dict]) -> Path:
    """``slices.csv``: one row per slice and class (the slice's own figures repeated)."""
    path = Path(path)
    with atomic_csv(path) as f:
        w = csv.writer(f)
        w.writerow([column, "n", "accuracy", "ece", "small", "class", "recall"])
        for s in slices:
            for c, r in s["recall"].items():
                w.writerow([s["slice"], s["n"], f"{s['accuracy']:.6f}", f"{s['ece']:.6f}",
                            int(s["small"]), c, f"{r:.6f}"])  # fmt: skip
    return path

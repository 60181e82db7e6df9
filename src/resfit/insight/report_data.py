"""What a single-label report shows (:class:`ReportData`) and the numbers computed from it once
(:class:`Metrics`, :func:`compute_metrics`); the sections are in :mod:`.report_sections`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from sklearn.metrics import (
    balanced_accuracy_score,
    precision_recall_fscore_support,
)

from ..tasks.calibration import (
    Calibration,
    calibrate_temperature,
    expected_calibration_error,
    softmax,
)
from .calibration import bootstrap_accuracy_ci

__all__ = ["IMBALANCE_RATIO", "TOP_WRONG", "Metrics", "ReportData", "compute_metrics"]

TOP_WRONG = 12  # confidently wrong images shown
IMBALANCE_RATIO = 3.0  # largest / smallest class above this gets a warning


@dataclass
class ReportData:
    """Everything a report shows. Arrays are numpy; only ``class_names``, ``y_true`` and
    ``logits`` are required.

    - ``y_true``: (N,) integer labels; ``logits``: (N, K) raw model outputs for the same images
      (uncalibrated; the report applies ``temperature`` itself).
    - ``paths``: the N image files, in the same order (for thumbnails); may be empty.
    - ``history``: one dict per epoch with keys ``epoch``, ``train_loss``, ``train_acc``,
      ``val_loss``, ``val_acc`` (missing or None values are skipped); empty for eval-only.
    - ``temperature``: T fitted on the *validation* set (``calibration.fit_temperature``);
      None: the report fits it on these logits (``calibration.calibrate_temperature``, so
      T = 1 when the fit would raise the ECE) and says that this is optimistic.
    - ``calibration``: the validation set's :class:`~resfit.tasks.calibration.Calibration`; when
      given, its ``temperature`` is used and its ``reason`` shown (whether T was kept).
    - ``data_summary``: ``{"counts": {split: {class: n}}, "skipped": [{"path", "reason"}] or
      [(path, reason)], "duplicates": [leakage.Duplicate or its to_dict()], "notes": [str],
      "audit": the label audit's summary with ``html`` and ``csv`` links}``; every key
      optional. A split whose counts are all 0 (no test split, say) is absent: no column, no
      warning.
    - ``explain(path, class_idx)``: a Grad-CAM overlay of that image for that class
      (``explain.grad_cam`` + ``explain.overlay_cam``), or None for no overlays.
    - ``split``: which split ``y_true``/``logits`` come from, as shown to the reader.
    """

    title: str
    class_names: Sequence[str]
    y_true: np.ndarray
    logits: np.ndarray
    paths: Sequence[str | os.PathLike] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    config: Mapping = field(default_factory=dict)
    temperature: float | None = None
    data_summary: Mapping = field(default_factory=dict)
    explain: Callable[[str, int], Image.Image] | None = None
    split: str = "validation"
    calibration: Calibration | None = None
    # RUN/unknown.json's record with the validation scores ("val_scores"): the "When not to
    # answer" section; None: the run has no unknown score.
    unknown: Mapping | None = None


@dataclass
class Metrics:
    """The numbers the sections show, computed once from a :class:`ReportData`."""

    y_true: np.ndarray
    y_pred: np.ndarray
    probs_raw: np.ndarray
    probs: np.ndarray  # temperature-scaled
    temperature: float
    temperature_fitted_here: bool
    calibration_note: str  # why this temperature: kept, or T = 1 and why
    accuracy: float
    ci: tuple[float, float]
    balanced_accuracy: float
    macro_f1: float
    ece_before: float
    ece_after: float


def compute_metrics(data: ReportData) -> Metrics:
    """Check the labels against the logits and compute every metric the report shows."""
    k = len(data.class_names)
    y_true = np.asarray(data.y_true).reshape(-1).astype(np.int64)
    logits = np.asarray(data.logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape != (len(y_true), k):
        raise ValueError(
            f"logits must be (N, K) = ({len(y_true)}, {k}) to match y_true and class_names, "
            f"got {logits.shape}"
        )
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}]")
    y_pred = logits.argmax(axis=1) if len(y_true) else np.zeros(0, np.int64)
    calib = data.calibration
    fitted_here = calib is None and data.temperature is None
    if fitted_here:
        import torch  # only needed for the fit

        calib = calibrate_temperature(torch.from_numpy(logits), torch.from_numpy(y_true))
    t = float(calib.temperature) if calib is not None else float(data.temperature)
    probs_raw, probs = softmax(logits), softmax(logits, t)
    present = np.unique(y_true)
    _, _, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(k), zero_division=0
    )
    return Metrics(
        y_true=y_true,
        y_pred=y_pred,
        probs_raw=probs_raw,
        probs=probs,
        temperature=t,
        temperature_fitted_here=fitted_here,
        calibration_note=calib.reason if calib is not None else "",
        accuracy=float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        ci=bootstrap_accuracy_ci(y_true, y_pred),
        # Mean recall over the classes that occur (sklearn warns on absent ones).
        balanced_accuracy=float(balanced_accuracy_score(y_true, y_pred))
        if len(present)
        else float("nan"),
        macro_f1=float(np.mean(f1[present])) if len(present) else float("nan"),
        ece_before=expected_calibration_error(probs_raw, y_true),
        ece_after=expected_calibration_error(probs, y_true),
    )

"""How sure is the model, and how sure may *we* be about its accuracy?

- ``fit_temperature``: temperature scaling (Guo et al. 2017), one scalar T fitted on held-out
  logits by minimising the negative log-likelihood; predictions (the argmax) do not change.
- ``calibrate_temperature``: that fit, kept only when it lowers the ECE on the logits it was
  fitted on (the NLL optimum can raise it), with the figures and the reason as a
  :class:`Calibration`.
- ``expected_calibration_error``: the gap between confidence and accuracy, binned by confidence.
- ``calibrate_multilabel``: for multi-label runs, a temperature per class (each sigmoid fitted
  on its own, as Platt scaling without the bias) and the threshold per class that maximises
  F1 on validation, as a :class:`MultiLabelCalibration`.

The reliability diagram and the bootstrap interval are :mod:`resfit.insight.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Calibration",
    "MultiLabelCalibration",
    "binary_calibration_error",
    "calibrate_multilabel",
    "calibrate_temperature",
    "calibration_bins",
    "expected_calibration_error",
    "fit_temperature",
    "softmax",
    "tune_thresholds",
]

# T outside this range means the logits are degenerate (all equal, or one huge class); the
# clamp keeps a bad validation set from producing a temperature that wrecks every probability.
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _nll(log_t: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits / log_t.exp(), labels)


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The temperature T that minimises the NLL of ``softmax(logits / T)`` on ``labels``.

    Fit it on the validation set, never on the test set. Optimised over log T (so T stays
    positive) with L-BFGS from the best point of a coarse grid (the NLL in log T is smooth but
    can be flat far from the optimum). Returns 1.0 (no change) when there is nothing to fit:
    no samples, non-finite logits, or a fit that is not better than T = 1.
    """
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0 or logits.shape[1] < 2 or not torch.isfinite(logits).all():
        return 1.0
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}]")

    with torch.no_grad():
        grid = torch.linspace(math.log(T_MIN), math.log(T_MAX), 41, dtype=torch.float64)
        losses = torch.stack([_nll(g, logits, labels) for g in grid])
        start = grid[int(torch.argmin(losses))]
        nll_at_1 = float(_nll(torch.zeros((), dtype=torch.float64), logits, labels))

    log_t = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _nll(log_t, logits, labels)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under no_grad
        opt.step(closure)

    t = float(log_t.detach().exp().clamp(T_MIN, T_MAX))
    with torch.no_grad():
        nll_t = float(_nll(torch.tensor(math.log(t), dtype=torch.float64), logits, labels))
    # No gain (flat NLL, e.g. all-equal logits) means there is nothing to correct.
    if not math.isfinite(t) or not math.isfinite(nll_t) or not nll_t < nll_at_1 - 1e-9:
        return 1.0
    return t


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate_temperature`.

    ``temperature`` is the one to use: the fitted one (``fitted``) when ``kept``, else 1.0.
    ``ece_before`` is the ECE at T = 1, ``ece_fitted`` at the fitted T, ``ece_after`` at
    ``temperature``; ``reason`` says in one sentence what was chosen and why.
    """

    temperature: float
    fitted: float
    ece_before: float
    ece_fitted: float
    ece_after: float
    kept: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def calibrate_temperature(logits: Tensor, labels: Tensor, n_bins: int = 15) -> Calibration:
    """Fit a temperature on held-out ``logits`` and keep it only if it lowers their ECE.

    The fit minimises the NLL, and the NLL optimum need not lower the ECE: on a small or
    lopsided validation set a few confident mistakes pull T up until every right answer looks
    unsure (measured: hold-out ants/bees, ECE 0.079 at T = 1 and 0.104 at the fitted T). Then
    T = 1 is kept, and ``reason`` says so.
    """
    fitted = fit_temperature(logits, labels)
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64).numpy()
    y = torch.as_tensor(labels).detach().to("cpu", torch.long).reshape(-1).numpy()
    if not np.isfinite(z).all():  # fit_temperature gave 1.0; the ECE is undefined
        nan = float("nan")
        return Calibration(1.0, 1.0, nan, nan, nan, False, "non-finite logits: T = 1")
    ece_before = expected_calibration_error(softmax(z), y, n_bins)
    ece_fitted = expected_calibration_error(softmax(z, fitted), y, n_bins)
    if fitted == 1.0:
        reason = "no temperature fits better than T = 1 (the NLL does not fall): T = 1"
        kept = False
    elif ece_fitted < ece_before:
        reason = f"T = {fitted:.3f} lowers the ECE from {ece_before:.4f} to {ece_fitted:.4f}"
        kept = True
    else:
        reason = (
            f"the fitted T = {fitted:.3f} would raise the ECE from {ece_before:.4f} to "
            f"{ece_fitted:.4f} on the images it was fitted on: kept T = 1"
        )
        kept = False
    return Calibration(
        temperature=fitted if kept else 1.0,
        fitted=fitted,
        ece_before=ece_before,
        ece_fitted=ece_fitted,
        ece_after=ece_fitted if kept else ece_before,
        kept=kept,
        reason=reason,
    )


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs must be (N, K) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    return probs, labels


def calibration_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width confidence bins: (bin edges, mean confidence, accuracy, count) per bin.

    Confidence is the top-class probability; a bin is (lo, hi], the first one [0, hi].
    Empty bins have NaN confidence and accuracy.
    """
    probs, labels = _check_probs(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.zeros(0, bool)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins) / count
    return edges, mean_conf, acc, count


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: sum over confidence bins of |accuracy - confidence| weighted by the bin's share.

    0 is perfectly calibrated; a model that says 90 % and is right 70 % of the time scores 0.2.
    """
    _, conf, acc, count = calibration_bins(probs, labels, n_bins)
    n = count.sum()
    if n == 0:
        return 0.0
    keep = count > 0
    return float(np.sum(np.abs(acc[keep] - conf[keep]) * count[keep]) / n)


# ---------------------------------------------------------------------------------------------
# Multi-label: a temperature and a decision threshold per class


def _bce_per_class(log_t: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits / log_t.exp(), targets, reduction="none").mean(
        0
    )


def fit_temperatures(logits: Tensor, targets: Tensor, max_iter: int = 100) -> list[float]:
    """A temperature per class minimising that class's binary NLL of ``sigmoid(logits / T)``.

    The classes are independent sigmoids, so the joint fit is K one-dimensional fits; one
    L-BFGS over log T (all classes at once) does them. A class keeps T = 1 where the fit
    does not lower its NLL (no positives or no negatives: nothing to fit).
    """
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(targets).detach().to("cpu", torch.float64)
    if z.ndim != 2 or z.shape != y.shape:
        raise ValueError(f"logits and targets must both be (N, K), got {tuple(z.shape)} and {tuple(y.shape)}")  # fmt: skip
    k = z.shape[1]
    if z.shape[0] == 0 or not torch.isfinite(z).all():
        return [1.0] * k
    log_t = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _bce_per_class(log_t, z, y).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        t = log_t.detach().exp().clamp(T_MIN, T_MAX)
        before = _bce_per_class(torch.zeros(k, dtype=torch.float64), z, y)
        after = _bce_per_class(t.log(), z, y)
    informative = (y > 0.5).any(0) & (y < 0.5).any(0)
    keep = informative & (after < before - 1e-9) & torch.isfinite(t)
    return [float(t[j]) if keep[j] else 1.0 for j in range(k)]


def binary_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """Class-wise ECE for multi-label outputs: each class's probability binned against how
    often the class is present, the gaps weighted by bin size, averaged over classes."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64) > 0.5
    if p.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    errors = []
    for j in range(p.shape[1]):
        idx = np.clip(np.searchsorted(edges, p[:, j], side="left") - 1, 0, n_bins - 1)
        conf = np.bincount(idx, weights=p[:, j], minlength=n_bins)
        freq = np.bincount(idx, weights=y[:, j].astype(np.float64), minlength=n_bins)
        errors.append(np.abs(conf - freq).sum() / len(p))  # sum of count/N * gap
    return float(np.mean(errors))


def tune_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per class, the probability threshold (predict the class when ``p >= threshold``) with
    the best F1 on these images (scikit-learn's precision-recall curve). The threshold sits
    halfway between the score that reaches that F1 and the next lower score, so a new image
    scored like a validation one is decided the same way. 0.5 for a class without positives.
    """
    from sklearn.metrics import precision_recall_curve

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets) > 0.5
    out = []
    for j in range(p.shape[1]):
        if not y[:, j].any():
            out.append(0.5)
            continue
        prec, rec, thr = precision_recall_curve(y[:, j], p[:, j])
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        best = float(thr[int(np.argmax(f1))])
        below = p[:, j][p[:, j] < best]
        out.append((best + float(below.max())) / 2 if below.size else best)
    return out


@dataclass(frozen=True)
class MultiLabelCalibration:
    """What :func:`calibrate_multilabel` fitted: per class (in class order) the temperature
    and the threshold; the class-wise ECE before and after; the micro-F1 on validation at
    p >= 0.5 and at the tuned thresholds; ``reason`` in one sentence."""

    temperature: list[float]
    thresholds: list[float]
    ece_before: float
    ece_after: float
    f1_at_half: float
    f1_tuned: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"task": "multilabel", **asdict(self)}


def calibrate_multilabel(logits: Tensor, targets: Tensor) -> MultiLabelCalibration:
    """Temperatures per class, then thresholds per class on the calibrated probabilities,
    both fitted on held-out (validation) logits."""
    from sklearn.metrics import f1_score

    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(targets).detach().to("cpu", torch.float64).numpy() > 0.5
    temps = fit_temperatures(z, torch.from_numpy(y.astype(np.float64)))
    raw = torch.sigmoid(z).numpy()
    cal = torch.sigmoid(z / torch.tensor(temps, dtype=torch.float64)).numpy()
    thresholds = tune_thresholds(cal, y)
    ece_before, ece_after = binary_calibration_error(raw, y), binary_calibration_error(cal, y)
    f1_half = float(f1_score(y, cal >= 0.5, average="micro", zero_division=0))
    f1_tuned = float(f1_score(y, cal >= np.array(thresholds), average="micro", zero_division=0))
    changed = sum(t != 1.0 for t in temps)
    reason = (
        f"{changed} of {len(temps)} classes rescaled (class-wise ECE {ece_before:.4f} -> "
        f"{ece_after:.4f}); thresholds tuned for F1 (micro-F1 {f1_half:.4f} at 0.5 -> "
        f"{f1_tuned:.4f} on validation, optimistic there)"
    )
    return MultiLabelCalibration(
        temps, thresholds, ece_before, ece_after, f1_half, f1_tuned, reason
    )

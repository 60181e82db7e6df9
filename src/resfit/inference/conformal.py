"""Answers with a guarantee: conformal prediction sets and selective prediction.

    q = conformal_threshold(cal_probs, cal_labels, coverage=0.9, method="aps")
    sets = prediction_sets(probs, q, method="aps")     # lists of class indices
    sel = selective_threshold(cal_conf, cal_correct, max_risk=0.02)

**Split conformal** (Vovk; Angelopoulos & Bates 2021): each calibration image gets a score of
how far down its ranked probabilities its true class sits; the ``ceil((n+1) c)``-th smallest
score is the threshold, and the set of classes whose score lies at or under it holds the true
class for at least a fraction ``c`` of new images from the same distribution (exchangeable
with the calibration images). APS scores a class by the probability mass ranked above it and
a uniform share of its own (randomised, so that coverage is close to the target rather than
far above it: measured 0.996 for a 0.9 target without); RAPS adds ``lam`` for every rank past ``k_reg`` (smaller sets when the tail is flat).
The top class is always in the set (coverage can only grow). Measured in ``bench/unknown.py``.

**Selective prediction** (Geifman & El-Yaniv 2017, fixed-sequence testing as in
Angelopoulos et al.'s Learn-then-Test): candidate confidence thresholds are tested from the
strictest that could pass to the loosest; each is accepted while the Clopper-Pearson upper
bound (level ``delta``) of the error among the calibration images it accepts is at most
``max_risk``; the last one accepted is kept. With probability at least ``1 - delta`` its
error on new images is at most ``max_risk``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import ConfigError

__all__ = [
    "CONFORMAL_METHODS",
    "Selective",
    "conformal_threshold",
    "prediction_sets",
    "selective_threshold",
]

CONFORMAL_METHODS = ("aps", "raps")
RAPS_LAMBDA, RAPS_K = 0.01, 2  # Angelopoulos et al.'s ImageNet-scale choice; see the bench


def _check_fraction(value: float, option: str) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{option} must be a fraction between 0 and 1 (e.g. 0.9), got {value}")


def _tie_breaks(p: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per image, a function of its probabilities alone (the bits
    of a hash of them): the same image gets the same set in every batch, CSV and answer."""
    rows = np.ascontiguousarray(p, np.float32)
    return np.array([int(hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest(), 16) / 2**64
                     for r in rows])  # fmt: skip


def _class_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """(N, C) conformity score of every class: the mass ranked above it plus a uniform share
    of its own (randomised APS: exact coverage rather than far above it; + the RAPS rank
    penalty)."""
    if method not in CONFORMAL_METHODS:
        raise ConfigError(f"conformal method {method!r}: choose one of {CONFORMAL_METHODS}")
    p = np.asarray(probs, np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, 1)
    cum = np.cumsum(ranked, 1) - _tie_breaks(p)[:, None] * ranked
    if method == "raps":
        cum = cum + RAPS_LAMBDA * np.maximum(0, np.arange(1, p.shape[1] + 1) - RAPS_K)
    out = np.empty_like(cum)
    np.put_along_axis(out, order, cum, 1)
    return out


def conformal_threshold(
    probs: np.ndarray, labels: np.ndarray, coverage: float, method: str = "aps"
) -> float:
    """The split-conformal threshold from calibration probabilities (N, C) and true labels;
    ``inf`` (every class) when there are too few images for ``coverage``."""
    _check_fraction(coverage, "--conformal")
    s = _class_scores(probs, method)[np.arange(len(labels)), np.asarray(labels)]
    n = len(s)
    rank = math.ceil((n + 1) * coverage)
    return float("inf") if rank > n else float(np.sort(s)[rank - 1])


def prediction_sets(probs: np.ndarray, threshold: float, method: str = "aps") -> list[list[int]]:
    """Each image's set of class indices, most probable first (never empty)."""
    p = np.asarray(probs, np.float64)
    s = _class_scores(p, method)
    inside = s <= threshold
    inside[np.arange(len(p)), p.argmax(1)] = True
    order = np.argsort(-p, axis=1, kind="stable")
    return [[int(j) for j in row if keep[j]] for row, keep in zip(order, inside, strict=True)]


def _log_factorials(n: int) -> np.ndarray:
    """log(j!) for j = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])


def _binom_cdf(k: int, n: int, p: float, logfact: np.ndarray) -> float:
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1)
    logs = logfact[n] - logfact[i] - logfact[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    return float(np.exp(logs).sum())


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """The one-sided upper confidence bound (level ``1 - delta``) of an error rate seen as
    ``errors`` out of ``n`` (bisection on the binomial CDF)."""
    if n == 0:
        return 1.0
    logfact = _log_factorials(n)
    lo, hi = errors / n, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binom_cdf(errors, n, mid, logfact) > delta else (lo, mid)
    return hi


@dataclass(frozen=True)
class Selective:
    """A confidence threshold (answer at or above it) with what it gave on calibration."""

    threshold: float
    accepted: float  # fraction of calibration images accepted
    risk: float  # their error rate
    bound: float  # its upper confidence bound


def selective_threshold(
    confidence: np.ndarray, correct: np.ndarray, max_risk: float, delta: float = 0.05
) -> Selective:
    """The loosest confidence threshold whose error among accepted images stays at most
    ``max_risk`` with probability ``1 - delta`` (threshold ``inf``: none does)."""
    _check_fraction(max_risk, "--max-risk")
    conf = np.asarray(confidence, np.float64)
    order = np.argsort(-conf, kind="stable")
    wrong = np.cumsum(~np.asarray(correct, bool)[order])
    n = len(conf)
    # Fewer images than this cannot show max_risk even with no error ((1-r)^m <= delta); and
    # the sequence starts at a tenth of the images at least, as one early error among a few
    # dozen would end it (the start depends on n alone, so the bound still holds).
    least = math.ceil(math.log(delta) / math.log1p(-max_risk))
    first = min(n, max(1, least, n // 10))
    best = Selective(float("inf"), 0.0, 0.0, 1.0)
    for m in range(first, n + 1, max(1, n // 400)):
        # Ties: a threshold accepts every image at its confidence, so count them all.
        t = conf[order[m - 1]]
        m_all = int(np.searchsorted(-conf[order], -t, side="right"))
        errors = int(wrong[m_all - 1])
        bound = clopper_pearson_upper(errors, m_all, delta)
        if bound > max_risk:
            break
        best = Selective(float(t), m_all / n, errors / m_all, bound)
    return best

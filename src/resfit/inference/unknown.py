"""Unknown inputs: a score of how unlike the training data an image is, and its threshold.

    det = fit_detector(train_feats, train_labels, head_w, head_b, "knn")   # at training's end
    det = det.with_threshold(det.score(val_feats, val_logits), accept=0.95)
    s = det.score(feats, logits)       # higher = less like the training data
    unknown = s > det.threshold

Every score reads the pooled features (the embedding ``resfit embed`` computes, before L2
normalisation) and/or the logits; all are numpy, so any engine's logits and the same features
give the same flags. The scores (higher means "more unknown"):

- ``msp``: minus the maximum softmax probability (the baseline, Hendrycks & Gimpel 2017);
- ``energy``: minus logsumexp of the logits (Liu et al. 2020);
- ``maxlogit``: minus the largest logit (Hendrycks et al. 2022);
- ``mahalanobis``: the smallest Mahalanobis distance to a class mean, shared covariance
  (Lee et al. 2018);
- ``knn``: one minus the cosine similarity to the k-th nearest training embedding (Sun et al.
  2022, k=10);
- ``vim``: ViM (Wang et al. 2022), the residual of the features outside their principal
  subspace, scaled, minus the energy.

The default is ``vim``, measured in ``bench/unknown.py`` (CIFAR-10 ResNet-56, cifar10-jpg test
in, flowers5 / digits at 32 px out; AUROC): msp 0.771 / 0.799, energy 0.808 / 0.943,
maxlogit 0.808 / 0.938, mahalanobis 0.796 / 0.998, knn 0.869 / 0.997, vim 0.870 / 0.997.
knn ties it (and has the lower FPR at 95 % TPR on flowers5, 0.53 against 0.55) but scores
~200x slower and keeps a bank of up to 10,000 embeddings in the run folder (1.3 MB at 64-d,
40 MB at ResNet-50's 2048-d); ViM keeps one D x D/4 matrix.
pytorch-ood (0.4.0, installs beside this torch) has these detectors, but they run a torch
model forward; these formulas are a few lines each and run on stored features in numpy, so
the threshold fitted at training holds for every engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = [
    "DEFAULT_SCORE",
    "SCORES",
    "UnknownDetector",
    "auroc",
    "fit_detector",
    "fpr_at_95",
    "threshold_at",
]

DEFAULT_SCORE = "vim"
KNN_K = 10  # Sun et al. use k=50 on 50k images; with a 12k-image bank k=10 measured best
# Training images the score is fitted on at most (an even spread; training embeds them once
# more at its end, so this bounds that pass), and kNN's bank (float16: 64-d -> 1.3 MB).
KNN_BANK = 10_000
VIM_DIM = 0.25  # the principal subspace keeps this fraction of the feature dimensions


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class _Score:
    fit: Callable[..., dict[str, np.ndarray]]
    score: Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], np.ndarray]
    needs_features: bool


def _no_state(*_: object) -> dict[str, np.ndarray]:
    return {}


def _fit_mahalanobis(f: np.ndarray, y: np.ndarray, *_: object) -> dict[str, np.ndarray]:
    classes = np.unique(y)
    mu = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - mu[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(f)
    return {"means": mu.astype(np.float32), "precision": np.linalg.pinv(cov).astype(np.float32)}


def _mahalanobis(st: Mapping[str, np.ndarray], f: np.ndarray, _: np.ndarray) -> np.ndarray:
    out = np.full(len(f), np.inf, np.float64)
    for m in st["means"]:
        d = f - m
        out = np.minimum(out, np.einsum("nd,de,ne->n", d, st["precision"], d))
    return out


def _fit_knn(f: np.ndarray, y: np.ndarray, *_: object) -> dict[str, np.ndarray]:
    # An even spread of the training set when it is larger than the bank (fixed, not random:
    # the same run gives the same bank).
    step = max(1, -(-len(f) // KNN_BANK))
    return {"bank": _unit(f[::step]).astype(np.float16)}


def _knn(st: Mapping[str, np.ndarray], f: np.ndarray, _: np.ndarray) -> np.ndarray:
    bank = st["bank"].astype(np.float32)
    k = min(KNN_K, len(bank))
    out = np.empty(len(f), np.float64)
    for i in range(0, len(f), 1024):  # bounded memory: 1024 x bank similarities at a time
        sims = _unit(f[i : i + 1024].astype(np.float32)) @ bank.T
        out[i : i + 1024] = 1.0 - np.partition(sims, -k, axis=1)[:, -k]
    return out


def _fit_vim(f: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    origin = -np.linalg.pinv(w) @ b  # the point the classifier maps to zero logits
    x = f - origin
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))  # about the origin, not the mean (as ViM)
    keep = max(1, round(VIM_DIM * f.shape[1]))
    principal = vecs[:, np.argsort(vals)[::-1][:keep]]  # stored (not the larger null space)
    logits = f @ w.T + b
    alpha = logits.max(1).mean() / max(_residual(x, principal).mean(), 1e-12)
    return {"origin": origin.astype(np.float32), "principal": principal.astype(np.float32),
            "alpha": np.float32([alpha])}  # fmt: skip


def _residual(x: np.ndarray, principal: np.ndarray) -> np.ndarray:
    """The norm of ``x`` outside the span of the orthonormal columns of ``principal``."""
    return np.sqrt(np.maximum((x * x).sum(1) - ((x @ principal) ** 2).sum(1), 0.0))


def _vim(st: Mapping[str, np.ndarray], f: np.ndarray, logits: np.ndarray) -> np.ndarray:
    resid = _residual(f.astype(np.float64) - st["origin"], st["principal"].astype(np.float64))
    return float(st["alpha"][0]) * resid - _logsumexp(logits)


def _msp(_: Mapping, f: np.ndarray, logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return -(e / e.sum(1, keepdims=True)).max(1)


SCORES: Registry = Registry("unknown score")
SCORES.register("msp", _Score(_no_state, _msp, False))
SCORES.register("energy", _Score(_no_state, lambda _, f, lg: -_logsumexp(lg), False))
SCORES.register("maxlogit", _Score(_no_state, lambda _, f, lg: -lg.max(1), False))
SCORES.register("mahalanobis", _Score(_fit_mahalanobis, _mahalanobis, True))
SCORES.register("knn", _Score(_fit_knn, _knn, True))
SCORES.register("vim", _Score(_fit_vim, _vim, True))


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(an unknown image scores higher than a known one), ties counting half."""
    k = np.sort(np.asarray(known, np.float64))
    u = np.asarray(unknown, np.float64)
    below, at_or_below = np.searchsorted(k, u, "left"), np.searchsorted(k, u, "right")
    return float(((below + at_or_below) / 2).sum() / max(len(k) * len(u), 1))


def fpr_at_95(known: np.ndarray, unknown: np.ndarray) -> float:
    """Fraction of unknown images accepted where 95 % of the known ones are (FPR at 95 % TPR)."""
    return float((np.asarray(unknown) <= np.quantile(known, 0.95)).mean())


def threshold_at(scores: np.ndarray, accept: float) -> float:
    """The score at or below which a fraction ``accept`` of ``scores`` (known images) lies."""
    if not 0.0 < accept < 1.0:
        raise ConfigError(f"the acceptance rate must be between 0 and 1, got {accept}")
    return float(np.quantile(np.asarray(scores, np.float64), accept, method="higher"))


@dataclass(frozen=True)
class UnknownDetector:
    """A fitted score (``name`` in :data:`SCORES`, its arrays in ``state``) and the threshold
    above which an image is called unknown (None until one is set)."""

    name: str
    state: dict[str, np.ndarray] = field(default_factory=dict)
    threshold: float | None = None
    how: str = ""  # how the threshold was chosen, in words (for the log and the report)

    @property
    def needs_features(self) -> bool:
        return SCORES.get(self.name).needs_features

    def score(self, feats: np.ndarray | None, logits: np.ndarray) -> np.ndarray:
        """The score of each image (N,), higher = less like the training data."""
        lg = np.asarray(logits, np.float32)
        f = None if feats is None else np.asarray(feats, np.float32)
        if f is None and self.needs_features:
            raise ConfigError(f"the {self.name} score needs the images' features")
        return np.asarray(SCORES.get(self.name).score(self.state, f, lg), np.float64)

    def with_threshold(self, known: np.ndarray, accept: float = 0.95) -> UnknownDetector:
        """Threshold at which a fraction ``accept`` of the known images' ``scores`` pass."""
        how = f"accepts {accept:.0%} of the validation images"
        return replace(self, threshold=threshold_at(known, accept), how=how)

    def with_false_accept(self, unknown: np.ndarray, rate: float) -> UnknownDetector:
        """Threshold at which a fraction ``rate`` of the known-unknown images' scores pass."""
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"--false-accept must be in [0, 1), got {rate}")
        u = np.sort(np.asarray(unknown, np.float64))
        k = int(np.floor(rate * len(u)))  # at most this many of them at or under the threshold
        t = float(u[k - 1]) if k > 0 else float(np.nextafter(u[0], -np.inf))
        how = f"lets {rate:.0%} of the {len(unknown)} images of the unknown folder through"
        return replace(self, threshold=t, how=how)


def fit_detector(
    feats: np.ndarray, labels: np.ndarray, head_w: np.ndarray, head_b: np.ndarray, name: str
) -> UnknownDetector:
    """Fit score ``name`` on the training features (N, D), their labels and the classifier."""
    spec = SCORES.get(name)
    f = np.asarray(feats, np.float64)
    state = spec.fit(f, np.asarray(labels), np.asarray(head_w, np.float64),
                     np.asarray(head_b, np.float64))  # fmt: skip
    return UnknownDetector(name, state)

"""Unknown inputs: a score of how unlike the training data an image is, and its threshold.

    det = fit_detector(train_feats, train_labels, head_w, head_b, "knn")   # at training's end
    det = det.with_threshold(det.score(val_feats, val_logits), accept=0.95)
    s = det.score(feats, logits)       # higher = less like the training data
    unknown = s > det.threshold

Every score reads the features of :func:`resfit.inference.stagestats.score_features` (the
pooled features, the embedding ``resfit embed`` computes before L2 normalisation, followed by
each stage's channel means and standard deviations) and/or the logits; all are numpy, so any
engine's logits and the same features give the same flags. The scores (higher means "more
unknown"):

- ``msp``: minus the maximum softmax probability (the baseline, Hendrycks & Gimpel 2017);
- ``energy``: minus logsumexp of the logits (Liu et al. 2020);
- ``maxlogit``: minus the largest logit (Hendrycks et al. 2022);
- ``mahalanobis``: the smallest Mahalanobis distance of the pooled features to a class mean,
  shared covariance (Lee et al. 2018);
- ``knn``: one minus the cosine similarity to the k-th nearest training embedding (Sun et al.
  2022, k=10);
- ``vim``: ViM (Wang et al. 2022), the residual of the pooled features outside their
  principal subspace, scaled, minus the energy;
- ``multistage``: ``vim`` plus the Mahalanobis distance (class means, shared covariance) of
  the statistics of every stage, each standardised on the validation images (the training
  images where none are given) and summed (the
  per-stage Mahalanobis scores of Lee et al. 2018, combined with equal weights since no
  unknown images are there to weigh them).

The default is ``multistage``, measured in ``bench/unknown.py`` (CIFAR-10 ResNet-56,
cifar10-jpg test in, flowers5 / digits at 32 px out; AUROC): msp 0.771 / 0.799,
energy 0.808 / 0.943, maxlogit 0.808 / 0.938, mahalanobis 0.796 / 0.998, knn 0.869 / 0.997,
vim 0.870 / 0.997, multistage 0.953 / 0.9995. The last stage's pooled features alone no
longer tell 32 px flower photos from CIFAR (all single-stage scores stay under 0.87); the
early stages' colour and texture statistics do (Mahalanobis on layer1 alone: 0.93).
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

DEFAULT_SCORE = "multistage"
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
    stages: bool = False  # also reads the stages' statistics after the pooled features
    # Refits what is set on held-out images (the validation split) where they are given.
    calibrate: Callable[..., dict[str, np.ndarray]] | None = None


def _no_state(*_: object) -> dict[str, np.ndarray]:
    return {}


def _fit_mahalanobis(
    f: np.ndarray, y: np.ndarray, *_: object, ridge: float = 0.0
) -> dict[str, np.ndarray]:
    classes = np.unique(y)
    mu = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - mu[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(f)
    cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
    return {"means": mu.astype(np.float32), "precision": np.linalg.pinv(cov).astype(np.float32)}


def _mahalanobis(st: Mapping[str, np.ndarray], f: np.ndarray, _: np.ndarray) -> np.ndarray:
    # min over classes of (f-m)' P (f-m) = f'Pf - 2 f'Pm + m'Pm: two matrix products, not one
    # quadratic form per class (1000 classes stay fast)
    p, mu = st["precision"].astype(np.float64), st["means"].astype(np.float64)
    x = f[:, : mu.shape[1]].astype(np.float64)
    xp = x @ p
    quad = (xp * x).sum(1, keepdims=True) - 2 * xp @ mu.T + ((mu @ p) * mu).sum(1)[None]
    return np.maximum(quad.min(1), 0.0)


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
        sims = _unit(f[i : i + 1024, : bank.shape[1]].astype(np.float32)) @ bank.T
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
    x = f[:, : len(st["origin"])].astype(np.float64) - st["origin"]
    resid = _residual(x, st["principal"].astype(np.float64))
    return float(st["alpha"][0]) * resid - _logsumexp(logits)


def _fit_multistage(
    f: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray
) -> dict[str, np.ndarray]:
    d = w.shape[1]
    if f.shape[1] <= d:
        raise ConfigError("the multistage score needs the stages' statistics after the pooled "
                          "features (resfit.inference.stagestats.score_features)")  # fmt: skip
    vim = _fit_vim(f[:, :d], y, w, b)
    # A small ridge: fewer training images than statistics (a small run) leave the covariance
    # singular, and the distances of new images along its null space would be unbounded.
    stages = _fit_mahalanobis(f[:, d:], y, ridge=1e-6)
    st = {
        **{f"vim.{k}": v for k, v in vim.items()},
        **{f"stages.{k}": v for k, v in stages.items()},
    }
    # Each part standardised (on the fitting images here; fit_detector moves it to the
    # validation images where given: in-sample distances are too small), then summed with
    # equal weights (Lee et al. combine their per-stage scores; with no unknown images to
    # weigh them, equally).
    return _standardise(st, f, f[:, :d] @ w.T + b)


def _standardise(
    st: dict[str, np.ndarray], f: np.ndarray, logits: np.ndarray
) -> dict[str, np.ndarray]:
    parts = _multistage_parts(st, f, logits)
    return {**st, "z": np.float32([[p.mean(), max(p.std(), 1e-12)] for p in parts])}


def _sub(st: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): v for k, v in st.items() if k.startswith(prefix)}


def _multistage_parts(
    st: Mapping[str, np.ndarray], f: np.ndarray, logits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    d = len(st["vim.origin"])
    return _vim(_sub(st, "vim."), f[:, :d], logits), _mahalanobis(
        _sub(st, "stages."), f[:, d:], logits
    )


def _multistage(st: Mapping[str, np.ndarray], f: np.ndarray, logits: np.ndarray) -> np.ndarray:
    z = st["z"].astype(np.float64)
    return sum((p - m) / s for p, (m, s) in zip(_multistage_parts(st, f, logits), z, strict=True))


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
SCORES.register(
    "multistage", _Score(_fit_multistage, _multistage, True, stages=True, calibrate=_standardise)
)


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
    feats: np.ndarray,
    labels: np.ndarray,
    head_w: np.ndarray,
    head_b: np.ndarray,
    name: str,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> UnknownDetector:
    """Fit score ``name`` on the training features, their labels and the classifier: the
    pooled features (N, D) or, as :func:`resfit.inference.stagestats.score_features` gives
    them, followed by the stages' statistics (N, D + S; a score that reads the pooled
    features alone takes the first D). ``val``: the validation images' features and logits,
    on which ``multistage`` standardises its parts."""
    spec = SCORES.get(name)
    f = np.asarray(feats, np.float64)
    if not spec.stages:
        f = f[:, : np.shape(head_w)[1]]
    state = spec.fit(f, np.asarray(labels), np.asarray(head_w, np.float64),
                     np.asarray(head_b, np.float64))  # fmt: skip
    if val is not None and spec.calibrate is not None and len(val[0]):
        state = spec.calibrate(
            state, np.asarray(val[0], np.float64), np.asarray(val[1], np.float64)
        )
    return UnknownDetector(name, {k: np.asarray(v) for k, v in state.items()})

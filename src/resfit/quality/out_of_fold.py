"""Out-of-fold probabilities: every image's class probabilities from a head that did not see
its label (k stratified folds over one feature pass), the features themselves, and the
regularisation that picks the head's strength. The audit's first step: a model that saw a wrong
label learns to repeat it; one that did not disagrees with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ConfigError

if TYPE_CHECKING:  # torch only where features are computed
    import torch
    from torch import Tensor, nn

    from ..data.datasets import DecodedImages

__all__ = ["HEADS", "extract_features", "out_of_fold_probabilities", "select_c"]

# The logistic-regression head on cached features. One objective, two solvers, the same
# probabilities (within 0.02); torch's full-batch L-BFGS chose C in 2.1-2.4 s where
# scikit-learn's lbfgs took 3.1-6.2 s (2,000 x 64 features, 5 C x 5 folds; bench/audit.py).
HEADS = ("torch", "sklearn")
# Inverse L2 strengths tried; the one with the lowest out-of-fold log-loss wins. On CIFAR with
# 10 % flipped labels the strongest regularisation ranked the flipped photos best (bench/audit.py).
C_GRID = (0.003, 0.01, 0.03, 0.1, 1.0)


# ---------------------------------------------------------------------------------------------
# Features and out-of-fold probabilities


def extract_features(
    model: nn.Module,
    decoded: DecodedImages,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    precision: str,
    *,
    channels_last: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """(N, C) float32 globally pooled features of every image (the classifier's input), one
    pass through the frozen backbone: the feature cache's own computation."""
    import torch

    from ..models.adapters import adapt
    from ..models.feature_cache import compute_features

    stage = adapt(model).stage_names[-1]
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    store = compute_features(
        model, stage, True, decoded, transform, 1, 0, "fp32", None, device, precision,
        channels_last, batch_size, "audit: features", progress,
    )  # fmt: skip
    return store.reshape(len(decoded), -1).float().numpy()


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def _sklearn_head(x: np.ndarray, y: np.ndarray, x_out: np.ndarray, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(x, y)
    probs = np.zeros((len(x_out), int(y.max()) + 1))
    probs[:, clf.classes_] = clf.predict_proba(x_out)
    return probs


def _lbfgs_linear(
    x: np.ndarray, k: int, c: float, data_loss: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """``(w, b)`` of a linear layer minimising ``data_loss(x @ w + b) + ||W||^2 / (2 C n)``
    (scikit-learn's objective for ``C``), by full-batch L-BFGS in float64."""
    import torch

    xt = torch.from_numpy(x).double()
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-6,
                            line_search_fn="strong_wolfe")  # fmt: skip
    decay = 1.0 / (2 * c * len(x))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = data_loss(xt @ w + b) + decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _torch_head(x: np.ndarray, y: np.ndarray, x_out: np.ndarray, c: float) -> np.ndarray:
    """The same objective as scikit-learn's LogisticRegression (mean cross-entropy + L2)."""
    import torch

    yt, k = torch.from_numpy(y).long(), int(y.max()) + 1
    w, b = _lbfgs_linear(x, k, c, lambda logits: torch.nn.functional.cross_entropy(logits, yt))
    logits = torch.from_numpy(x_out).double() @ w + b
    present = torch.bincount(yt, minlength=k) > 0  # a class the fold lacks gets nothing
    logits[:, ~present] = -torch.inf
    return torch.softmax(logits, 1).numpy()


def _torch_multilabel_head(
    x: np.ndarray, hot: np.ndarray, x_out: np.ndarray, c: float
) -> np.ndarray:
    """One-vs-rest logistic regression for multi-hot labels: K binary heads, their
    cross-entropies summed, the same L2."""
    import torch

    yt = torch.from_numpy(hot).double()

    def bce(logits: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, yt) * yt.shape[1]

    w, b = _lbfgs_linear(x, yt.shape[1], c, bce)
    return torch.sigmoid(torch.from_numpy(x_out).double() @ w + b).numpy()


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    folds: int = 5,
    seed: int = 0,
    head: str = "torch",
    c: float = 1.0,
) -> np.ndarray:
    """(N, K) class probabilities of every image from a logistic-regression head fitted on the
    other folds (stratified, shuffled by ``seed``) of standardised ``features``.

    ``head``: ``torch`` (L-BFGS on a linear layer, the default: faster) or ``sklearn``
    (LogisticRegression, the same objective); ``c``: the inverse L2 strength, as
    scikit-learn's ``C``.
    """
    from sklearn.model_selection import StratifiedKFold

    if head not in HEADS:
        raise ConfigError(f"--head must be one of {', '.join(HEADS)}, not {head!r}")
    fit = _sklearn_head if head == "sklearn" else _torch_head
    labels = np.asarray(labels, dtype=np.int64)
    features = np.asarray(features, dtype=np.float64)
    probs = np.zeros((len(labels), num_classes))
    kfold = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for tr, te in kfold.split(features, labels):
        x_tr, x_te = _standardise(features[tr], features[te])
        p = fit(x_tr, labels[tr], x_te, c)
        probs[te, : p.shape[1]] = p
    return probs


def out_of_fold_multilabel(
    features: np.ndarray, hot: np.ndarray, *, folds: int = 5, seed: int = 0, c: float = 0.03
) -> np.ndarray:
    """(N, K) per-class probabilities of every image from a one-vs-rest logistic head fitted on
    the other folds (shuffled by ``seed``) of standardised ``features``. ``c`` defaults to the
    strong regularisation the single-label search picks on real photos (0.01-0.03)."""
    from sklearn.model_selection import KFold

    hot = np.asarray(hot, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    probs = np.zeros(hot.shape)
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(features):
        x_tr, x_te = _standardise(features[tr], features[te])
        probs[te] = _torch_multilabel_head(x_tr, hot[tr], x_te, c)
    return probs


def select_c(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    folds: int = 5,
    seed: int = 0,
    head: str = "torch",
    grid: Sequence[float] = C_GRID,
) -> tuple[float, np.ndarray]:
    """The regularisation of :data:`C_GRID` whose out-of-fold probabilities give the given
    labels the lowest log-loss, with those probabilities. One number chosen on all labels:
    too little to fit their noise, and it keeps wrong labels from being learned by heart."""
    best: tuple[float, float, np.ndarray] | None = None
    rows = np.arange(len(labels))
    for c in grid:
        probs = out_of_fold_probabilities(features, labels, num_classes, folds=folds, seed=seed,
                                          head=head, c=c)  # fmt: skip
        loss = float(-np.log(probs[rows, labels] + 1e-12).mean())
        if best is None or loss < best[0]:
            best = (loss, c, probs)
    assert best is not None
    return best[1], best[2]

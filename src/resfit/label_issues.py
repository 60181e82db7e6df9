"""Which labels look wrong: out-of-fold probabilities, confident learning, near-duplicates that
disagree, outliers, and the audit's files.

The pieces of ``resfit audit`` that need no training, so that a finished run can audit its own
training data (``resfit train --audit``) without the training package importing the command:

    feats = extract_features(model, decoded, eval_tf, device, "fp32")          # (N, C)
    probs = out_of_fold_probabilities(feats, labels, num_classes, folds=5)     # (N, K)
    result = audit_probabilities(probs, labels, classes, paths, "OUT", features=feats)

- **Out-of-fold probabilities.** Every image's class probabilities come from a model that did
  not see its label: k stratified folds, a logistic-regression head fitted on the other k - 1
  folds' features (one feature pass, k head fits: seconds). A model that saw a wrong label
  learns to repeat it; one that did not disagrees with it.
- **Label issues** by confident learning (cleanlab's ``find_label_issues``, Northcutt et al.
  2021): per class, a confidence threshold (the mean probability the images given that class
  get for it) estimates how many images of class i really belong to j, and that many of the
  least likely ones are flagged. Ranked by how little probability the given label gets.
- **Near-duplicates with different labels**: the same picture twice (pHash of
  :mod:`resfit.leakage`, Hamming distance <= ``max_distance``) carrying two labels; at least
  one of them is wrong.
- **Outliers**: images far from all others in feature space (cleanlab's ``OutOfDistribution``:
  mean cosine distance to the k nearest neighbours), flagged beyond Tukey's far-out fence of
  that score; pictures that belong to no class, or broken files.
- **Multi-label** (:func:`multilabel_issues`): per image the labels that look missing and
  those that look extra, from a probability matrix and multi-hot labels.

Output: ``OUT/label_issues.csv`` (``path,given,suggested,score,kind,detail``, most likely wrong
first; ``score`` = 1 - the out-of-fold probability of the given label), ``OUT/audit.html``
(thumbnails in that order, self-contained like the run report) and ``OUT/audit.json``.

cleanlab is an extra: ``pip install 'resfit[audit]'``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write_text
from .data import display_path, open_csv
from .errors import ConfigError, DataError, MissingExtraError

if TYPE_CHECKING:  # torch only where features are computed
    import torch
    from torch import Tensor, nn

    from .data import DecodedImages

log = logging.getLogger("resfit")

__all__ = [
    "HEADS",
    "AuditResult",
    "Issue",
    "audit_images",
    "audit_probabilities",
    "check_audit",
    "check_folds",
    "conflicting_duplicates",
    "confident_learning",
    "extract_features",
    "margin_ranking",
    "multilabel_issues",
    "out_of_fold_probabilities",
    "outliers",
    "select_c",
    "write_audit",
]

# The logistic-regression head on cached features. One objective, two solvers, the same
# probabilities (within 0.02); torch's full-batch L-BFGS chose C in 2.1-2.4 s where
# scikit-learn's lbfgs took 3.1-6.2 s (2,000 x 64 features, 5 C x 5 folds; bench/audit.py).
HEADS = ("torch", "sklearn")
# Inverse L2 strengths tried; the one with the lowest out-of-fold log-loss wins. On CIFAR with
# 10 % flipped labels the strongest regularisation ranked the flipped photos best (bench/audit.py).
C_GRID = (0.003, 0.01, 0.03, 0.1, 1.0)
HTML_LIMIT = 300  # thumbnails in audit.html; the CSV has every row
_KIND_ORDER = {"label": 0, "near-duplicate": 1, "outlier": 2, "missing": 0, "extra": 0}


def _cleanlab() -> Any:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise MissingExtraError("cleanlab", "audit") from None
    import cleanlab.filter
    import cleanlab.outlier
    import cleanlab.rank

    return cleanlab


# ---------------------------------------------------------------------------------------------
# Checks


def check_folds(labels: np.ndarray, class_names: Sequence[str], folds: int, where: str) -> None:
    """Refuse what k-fold cross-validation cannot do, naming the problem and the fix."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {folds}")
    if len(labels) == 0:
        raise DataError(f"no readable labelled images in {where}: nothing to audit")
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(
            f"{where} has images of a single class ({class_names[present[0]]}): an audit "
            "compares classes, so it needs at least two"
        )
    small = [(class_names[c], int(counts[c])) for c in present if counts[c] < folds]
    if small:
        name, n = min(small, key=lambda x: x[1])
        others = f" (and {len(small) - 1} more class(es))" if len(small) > 1 else ""
        fix = f"lower --folds to {n}" if n >= 2 else "add images to it or remove its folder"
        raise DataError(
            f"class {name} has {n} image(s){others}, fewer than --folds {folds}: every fold "
            f"needs one of each class; {fix}"
        )


def check_multilabel_folds(
    hot: np.ndarray, class_names: Sequence[str], folds: int, where: str
) -> None:
    """The multi-label counterpart of :func:`check_folds`: enough images for ``folds`` folds,
    and every class given to at least ``folds`` images (else some fold's head never sees it)."""
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {folds}")
    if len(hot) < 2 * folds:
        raise DataError(f"{where} has {len(hot)} readable image(s): too few for {folds} folds")
    counts = np.asarray(hot).sum(0)
    small = [(class_names[c], int(counts[c])) for c in range(len(class_names)) if counts[c] < folds]
    if small:
        name, n = min(small, key=lambda x: x[1])
        raise DataError(
            f"label {name} is given to {n} image(s), fewer than --folds {folds}: lower --folds "
            f"to {max(n, 2)} or add images that carry it"
        )


def check_audit(classes: Sequence[str], labels: Sequence[int], where: str, folds: int = 5) -> None:
    """What ``resfit train --audit`` checks before training: cleanlab is installed, and the
    split can be cut into ``folds`` folds (stratified; multi-hot labels: every label in each)."""
    _cleanlab()
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim == 2:
        check_multilabel_folds(labels, classes, folds, where)
    else:
        check_folds(labels, classes, folds, where)


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

    from .adapters import adapt
    from .transfer import compute_features

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


# ---------------------------------------------------------------------------------------------
# Finding the issues


def confident_learning(
    probs: np.ndarray, labels: np.ndarray, filter_by: str = "low_self_confidence"
) -> np.ndarray:
    """cleanlab's ``find_label_issues``: the indices of the images whose label looks wrong,
    ranked by self-confidence (the lowest probability of the given label first).

    ``filter_by="low_self_confidence"``: cleanlab estimates from the confident joint how many
    labels are wrong and flags that many with the lowest self-confidence. On CIFAR photos with
    10 % flipped it flagged with 83-97 % precision where cleanlab's default,
    ``prune_by_noise_rate``, reached 59-77 % (bench/audit.py)."""
    cl = _cleanlab()
    return np.asarray(
        cl.filter.find_label_issues(np.asarray(labels), probs, filter_by=filter_by,
                                    return_indices_ranked_by="self_confidence", n_jobs=1),
        dtype=np.int64,
    )  # fmt: skip


def margin_ranking(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every index, most likely wrong first, by the normalised margin: the probability of the
    given label minus the largest other one (the bench compares it with cleanlab's ranking)."""
    n = np.arange(len(labels))
    given = probs[n, labels]
    others = probs.copy()
    others[n, labels] = -np.inf
    return np.argsort(given - others.max(1), kind="stable")


def conflicting_duplicates(
    paths: Sequence[str | os.PathLike], labels: np.ndarray, max_distance: int = 4
) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)``, i < j, of the same picture (identical files, or pHash within
    ``max_distance`` bits) that carry different labels."""
    from .leakage import hash_images

    hashes = {h.path: h for h in hash_images(paths)}
    found: dict[tuple[int, int], int] = {}
    by_sha: dict[str, list[int]] = {}
    idx, ph = [], []
    for i, p in enumerate(paths):
        h = hashes.get(Path(p))
        if h is None:
            continue
        by_sha.setdefault(h.sha256, []).append(i)
        if h.phash is not None:
            idx.append(i)
            ph.append(h.phash)
    for group in by_sha.values():
        for a in range(len(group)):
            for b in group[a + 1 :]:
                found[(group[a], b)] = 0
    arr, idx_arr = np.array(ph, dtype=np.uint64), np.array(idx, dtype=np.int64)
    block = max(1, (1 << 24) // max(len(arr), 1))  # rows per block: XOR matrix <= 128 MB
    for start in range(0, len(arr), block):
        dist = np.bitwise_count(arr[start : start + block, None] ^ arr[None, :])
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i, j = int(idx_arr[start + r]), int(idx_arr[c])
            if i < j:
                found.setdefault((i, j), int(dist[r, c]))
    return sorted(
        ((i, j, d) for (i, j), d in found.items() if labels[i] != labels[j]),
        key=lambda t: (t[2], t[0], t[1]),
    )


def outliers(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the outliers, most atypical first; every image's score in (0, 1], low =
    atypical): cleanlab's OutOfDistribution on the features (mean cosine distance to the k
    nearest neighbours, as ``exp(-distance / scale)``), flagged beyond Tukey's far-out fence
    ``Q3 + 3 IQR`` of ``-log(score)``, the distance: a set without outliers flags few or none."""
    cl = _cleanlab()
    k = max(1, min(10, len(features) - 1))
    ood = cl.outlier.OutOfDistribution(params={"k": k})
    scores = np.asarray(ood.fit_score(features=np.asarray(features, np.float32), verbose=False))
    dist = -np.log(np.clip(scores, 1e-300, None))
    q1, q3 = np.percentile(dist, [25, 75])
    flagged = np.flatnonzero(dist > q3 + 3 * (q3 - q1))
    return flagged[np.argsort(scores[flagged], kind="stable")], scores


@dataclass(frozen=True)
class Issue:
    """One image whose label looks wrong, or that deserves a look.

    ``score``: how likely the given label is wrong (1 - its out-of-fold probability);
    ``kind``: ``label`` (confident learning), ``near-duplicate``, ``outlier`` (joined by
    ``+`` when several apply) or, multi-label, ``missing``/``extra``; ``detail`` says why.
    """

    index: int
    path: str
    given: str
    suggested: str
    score: float
    kind: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _single_label_issues(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], paths: Sequence[str],
    flagged: np.ndarray, dups: list[tuple[int, int, int]], outlying: np.ndarray,
) -> list[Issue]:  # fmt: skip
    """One row per image, its reasons joined, label issues first (ranked), then duplicates,
    then outliers."""
    kinds: dict[int, list[str]] = {}
    details: dict[int, list[str]] = {}
    twin: dict[int, int] = {}
    for i in flagged.tolist():
        kinds.setdefault(i, []).append("label")
    for i, j, d in dups:
        for a, b in ((i, j), (j, i)):
            kinds.setdefault(a, []).append("near-duplicate")
            twin.setdefault(a, b)
            details.setdefault(a, []).append(
                f"same picture as {display_path(paths[b])} (labelled {classes[labels[b]]}, "
                f"distance {d})"
            )
    for i in outlying.tolist():
        kinds.setdefault(i, []).append("outlier")
        details.setdefault(i, []).append("far from every other image in feature space")
    rows = []
    for i, ks in kinds.items():
        ks = list(dict.fromkeys(ks))
        best = int(probs[i].argmax())
        if best == labels[i] and i in twin:
            best = int(labels[twin[i]])
        suggested = classes[best] if best != labels[i] else ""
        rows.append(Issue(i, str(paths[i]), classes[labels[i]], suggested,
                          float(1 - probs[i, labels[i]]), "+".join(ks),
                          "; ".join(dict.fromkeys(details.get(i, [])))))  # fmt: skip
    rank = {i: r for r, i in enumerate(flagged.tolist())}
    rows.sort(key=lambda r: (_KIND_ORDER[r.kind.split("+")[0]], rank.get(r.index, 0), -r.score))
    return rows


def multilabel_issues(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str] | None = None,
    thresholds: float | Sequence[float] = 0.5,
) -> list[Issue]:
    """Multi-label images whose labels look wrong, most likely first: cleanlab's multi-label
    ``find_label_issues`` on (N, K) out-of-fold probabilities and (N, K) multi-hot
    ``labels``. Per image, ``missing``: classes not given but predicted above their
    threshold; ``extra``: classes given but predicted below it. ``given`` and ``suggested``
    are ``;``-joined label sets, as in the manifest."""
    cl = _cleanlab()
    import cleanlab.multilabel_classification.filter as ml_filter
    import cleanlab.multilabel_classification.rank as ml_rank

    del cl
    probs, hot = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    if probs.shape != hot.shape or probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(
            f"probabilities {probs.shape} and multi-hot labels {hot.shape} must both be "
            f"(N, {len(classes)})"
        )
    thr = np.broadcast_to(np.asarray(thresholds, np.float64), (probs.shape[1],))
    as_lists = [np.flatnonzero(row).tolist() for row in hot]
    ranked = ml_filter.find_label_issues(as_lists, probs, return_indices_ranked_by="self_confidence",
                                         n_jobs=1)  # fmt: skip
    quality = ml_rank.get_label_quality_scores(as_lists, probs)
    predicted = probs >= thr
    rows = []
    for i in np.asarray(ranked, dtype=np.int64).tolist():
        missing = np.flatnonzero(predicted[i] & ~hot[i]).tolist()
        extra = np.flatnonzero(~predicted[i] & hot[i]).tolist()
        kinds = [k for k, v in (("missing", missing), ("extra", extra)) if v]
        detail = "; ".join(f"{k}: {', '.join(classes[c] for c in v)}"
                           for k, v in (("missing", missing), ("extra", extra)) if v)  # fmt: skip
        rows.append(Issue(
            i, str(paths[i]) if paths is not None else f"#{i}",
            ";".join(classes[c] for c in np.flatnonzero(hot[i])),
            ";".join(classes[c] for c in np.flatnonzero(predicted[i])),
            float(1 - quality[i]), "+".join(kinds) or "label", detail,
        ))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# The audit and its files


@dataclass
class AuditResult:
    """What an audit found, and where it wrote it."""

    issues: list[Issue]
    probabilities: np.ndarray  # (N, K) out-of-fold
    summary: dict[str, Any]
    out: Path
    files: dict[str, Path] = field(default_factory=dict)


def audit_probabilities(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    features: np.ndarray | None = None,
    max_distance: int = 4,
    meta: dict[str, Any] | None = None,
) -> AuditResult:
    """Label issues, conflicting near-duplicates and (with ``features``) outliers from
    out-of-fold probabilities; writes the CSV, HTML and JSON into ``out``."""
    labels = np.asarray(labels, dtype=np.int64)
    paths = [str(p) for p in paths]
    flagged = confident_learning(probs, labels)
    dups = conflicting_duplicates(paths, labels, max_distance) if max_distance >= 0 else []
    outlying = outliers(features)[0] if features is not None and len(features) > 2 else np.zeros(0, np.int64)  # fmt: skip
    issues = _single_label_issues(probs, labels, classes, paths, flagged, dups, outlying)
    summary = _summary(probs, labels, classes, issues, flagged, dups, outlying, meta or {})
    result = AuditResult(issues, probs, summary, Path(out))
    result.files = write_audit(out, issues, summary)
    log.info(
        "audit: %d label issue(s) of %d images (out-of-fold accuracy %.3f), %d conflicting "
        "near-duplicate pair(s), %d outlier(s): %s",
        len(flagged), len(labels), summary["oof_accuracy"], len(dups), len(outlying),
        result.files["html"],
    )  # fmt: skip
    return result


def audit_multilabel(
    probs: np.ndarray,
    hot: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    meta: dict[str, Any] | None = None,
) -> AuditResult:
    """Missing and extra labels of multi-label images from out-of-fold probabilities
    (:func:`multilabel_issues`); writes the CSV, HTML and JSON into ``out``."""
    from sklearn.metrics import average_precision_score

    hot = np.asarray(hot).astype(bool)
    issues = multilabel_issues(probs, hot, classes, [str(p) for p in paths])
    kinds = Counter(k for r in issues for k in r.kind.split("+"))
    scored = hot.any(0) & ~hot.all(0)  # AP is undefined for a class every image has, or none
    summary = {
        **(meta or {}), "task": "multilabel", "images": int(len(hot)), "classes": list(classes),
        "oof_mAP": float(average_precision_score(hot[:, scored], probs[:, scored], average="macro")),
        "label_issues": len(issues), "label_issue_share": float(len(issues) / max(len(hot), 1)),
        "images_with_missing_labels": int(kinds.get("missing", 0)),
        "images_with_extra_labels": int(kinds.get("extra", 0)),
    }  # fmt: skip
    result = AuditResult(issues, probs, summary, Path(out))
    result.files = write_audit(out, issues, summary)
    log.info("audit: %d multi-label image(s) look wrong of %d (out-of-fold mAP %.3f): %s",
             len(issues), len(hot), summary["oof_mAP"], result.files["html"])  # fmt: skip
    return result


def _summary(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], issues: list[Issue],
    flagged: np.ndarray, dups: list, outlying: np.ndarray, meta: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    pairs = Counter((r.given, r.suggested) for r in issues if "label" in r.kind.split("+"))
    per_class = Counter(classes[labels[i]] for i in flagged.tolist())
    return {
        **meta,
        "images": int(len(labels)),
        "classes": list(classes),
        "oof_accuracy": float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0,
        "label_issues": int(len(flagged)),
        "label_issue_share": float(len(flagged) / max(len(labels), 1)),
        "near_duplicate_conflicts": [[int(i), int(j), int(d)] for i, j, d in dups],
        "outliers": int(len(outlying)),
        "issues_per_class": {c: int(per_class.get(c, 0)) for c in classes},
        "top_confusions": [
            {"given": g, "suggested": s, "images": n} for (g, s), n in pairs.most_common(10)
        ],
    }


def write_audit(
    out: str | os.PathLike, issues: Sequence[Issue], summary: dict[str, Any]
) -> dict[str, Path]:
    """``label_issues.csv``, ``audit.html`` and ``audit.json`` in ``out`` (created)."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "label_issues.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open_csv(tmp, "w") as f:
        w = csv.writer(f)
        w.writerow(["path", "given", "suggested", "score", "kind", "detail"])
        for r in issues:
            w.writerow([r.path, r.given, r.suggested, f"{r.score:.4f}", r.kind, r.detail])
    os.replace(tmp, csv_path)
    json_path = out / "audit.json"
    atomic_write_text(json_path, json.dumps(summary, indent=2, default=str))
    html_path = write_audit_html(out / "audit.html", issues, summary)
    return {"csv": csv_path, "html": html_path, "json": json_path}


def _issue_card(r: Issue) -> str:
    from .report import _e, _img, _jpeg_uri, _thumbnail

    thumb = _thumbnail(r.path) if not r.path.startswith("#") else None
    pic = (_img(_jpeg_uri(thumb), "image", "thumb") if thumb
           else '<div class="missing">image not readable</div>')  # fmt: skip
    fix = f'<br>suggested: <span class="bad">{_e(r.suggested)}</span>' if r.suggested else ""
    detail = f"<br><small>{_e(r.detail)}</small>" if r.detail else ""
    return (
        f'<figure class="wrong">{pic}<figcaption><b title="{_e(r.path)}">{_e(Path(r.path).name)}'
        f"</b><br>given: {_e(r.given or '(none)')}{fix}<br>{_e(r.kind)}, score {r.score:.3f}"
        f"{detail}</figcaption></figure>"
    )


def write_audit_html(path: Path, issues: Sequence[Issue], summary: dict[str, Any]) -> Path:
    """A self-contained page (the run report's style and Content-Security-Policy: inline CSS,
    base64 thumbnails, nothing fetched) with the first :data:`HTML_LIMIT` issues in order."""
    from .report import _CSP, _CSS, _e, _section, _table

    n = summary.get("images", 0)
    rows = [[_e(k), _e(v)] for k, v in (
        ("images", n), ("out-of-fold accuracy", f"{summary.get('oof_accuracy', 0):.3f}"),
        ("label issues (confident learning)", summary.get("label_issues", 0)),
        ("near-duplicates with different labels", len(summary.get("near_duplicate_conflicts", []))),
        ("outliers", summary.get("outliers", 0)),
        ("model", summary.get("model", "")), ("folds", summary.get("folds", "")),
    )]  # fmt: skip
    conf = [[_e(c["given"]), _e(c["suggested"]), str(c["images"])]
            for c in summary.get("top_confusions", [])]  # fmt: skip
    intro = (
        "<p>Each image's class probabilities come from a model that did not see its label "
        "(out-of-fold). <b>label</b>: confident learning (cleanlab) says the given label is "
        "unlikely; <b>near-duplicate</b>: the same picture carries another label; "
        "<b>outlier</b>: far from every other image. Score: 1 - the out-of-fold probability "
        "of the given label. Check these first; fix or drop the wrong ones.</p>"
    )
    body = _table(["", ""], rows) + (
        "<h3>Most frequent suspected confusions</h3>"
        + _table(["given", "suggested", "images"], conf, "num")
        if conf
        else ""
    )
    shown = list(issues)[:HTML_LIMIT]
    more = (f"<p>{len(issues) - len(shown)} more in label_issues.csv.</p>"
            if len(issues) > len(shown) else "")  # fmt: skip
    gallery = f'<div class="gallery">{"".join(_issue_card(r) for r in shown)}</div>{more}'
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resfit audit: {len(issues)} image(s) to check</title><style>{_CSS}</style></head>
<body><main><header><h1>Which labels look wrong</h1><p>{len(issues)} of {n} images to check,
most likely wrong first</p></header>
{_section("summary", "Summary", intro + body)}
{_section("issues", "Images to check", gallery or "<p>No issues found.</p>")}
</main></body></html>
"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, path)
    return path


def audit_images(
    model: nn.Module,
    decoded: DecodedImages,
    transform: Callable[[Tensor], Tensor],
    classes: Sequence[str],
    out: str | os.PathLike,
    *,
    device: torch.device,
    precision: str,
    folds: int = 5,
    seed: int = 0,
    head: str = "torch",
    max_distance: int = 4,
    channels_last: bool = True,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
    where: str = "the data",
) -> AuditResult:
    """The frozen-backbone audit of decoded images: one feature pass, ``folds`` head fits,
    then :func:`audit_probabilities`."""
    import time

    labels = decoded.labels.numpy()
    multi = labels.ndim == 2  # multi-hot: a multi-label manifest
    if multi:
        check_multilabel_folds(labels, classes, folds, where)
    else:
        check_folds(labels, classes, folds, where)
    t0 = time.perf_counter()
    feats = extract_features(model, decoded, transform, device, precision,
                             channels_last=channels_last, progress=progress)  # fmt: skip
    t1 = time.perf_counter()
    if multi:
        probs = out_of_fold_multilabel(feats, labels, folds=folds, seed=seed)
    else:
        probs = out_of_fold_probabilities(
            feats, labels, len(classes), folds=folds, seed=seed, head=head
        )
    t2 = time.perf_counter()
    meta = {**(meta or {}), "folds": folds, "head": head, "seed": seed,
            "seconds": {"features": round(t1 - t0, 2), "heads": round(t2 - t1, 2)}}  # fmt: skip
    if multi:
        return audit_multilabel(probs, labels, classes, decoded.paths, out, meta=meta)
    return audit_probabilities(probs, labels, classes, decoded.paths, out, features=feats,
                               max_distance=max_distance, meta=meta)  # fmt: skip

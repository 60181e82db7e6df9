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
  :mod:`resfit.data.fingerprints`, Hamming distance <= ``max_distance``) carrying two labels; at least
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

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import ConfigError, DataError, MissingExtraError
from ..data.paths import display_path

if TYPE_CHECKING:  # torch only where features are computed
    import torch
    from torch import Tensor, nn

    from ..data.datasets import DecodedImages
from .audit_report import KIND_ORDER, Issue, audit_summary, write_audit
from .out_of_fold import extract_features, out_of_fold_multilabel, out_of_fold_probabilities

log = logging.getLogger("resfit")

__all__ = [
    "AuditResult",
    "audit_images",
    "audit_probabilities",
    "check_audit",
    "check_folds",
    "check_labels",
    "conflicting_duplicates",
    "confident_learning",
    "margin_ranking",
    "multilabel_issues",
    "outliers",
]


def import_cleanlab() -> Any:
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
    import_cleanlab()
    check_labels(np.asarray(labels, dtype=np.int64), classes, folds, where)


def check_labels(labels: np.ndarray, classes: Sequence[str], folds: int, where: str) -> None:
    """:func:`check_folds` for class indices, :func:`check_multilabel_folds` for multi-hot
    rows: the labels' own shape says which (the one entry point for callers)."""
    _WAYS[np.ndim(labels)].check(labels, classes, folds, where)


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
    cl = import_cleanlab()
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
    from ..data.fingerprints import hash_images

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
    cl = import_cleanlab()
    k = max(1, min(10, len(features) - 1))
    ood = cl.outlier.OutOfDistribution(params={"k": k})
    scores = np.asarray(ood.fit_score(features=np.asarray(features, np.float32), verbose=False))
    dist = -np.log(np.clip(scores, 1e-300, None))
    q1, q3 = np.percentile(dist, [25, 75])
    flagged = np.flatnonzero(dist > q3 + 3 * (q3 - q1))
    return flagged[np.argsort(scores[flagged], kind="stable")], scores


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
    rows.sort(key=lambda r: (KIND_ORDER[r.kind.split("+")[0]], rank.get(r.index, 0), -r.score))
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
    cl = import_cleanlab()
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
    summary = audit_summary(probs, labels, classes, issues, flagged, dups, outlying, meta or {})
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
    summary["headline"] = (f"{len(issues)} of {len(hot)} training images have labels that look "
                           f"missing or extra (out-of-fold mAP {summary['oof_mAP']:.3f})")  # fmt: skip
    result = AuditResult(issues, probs, summary, Path(out))
    result.files = write_audit(out, issues, summary)
    log.info("audit: %d multi-label image(s) look wrong of %d (out-of-fold mAP %.3f): %s",
             len(issues), len(hot), summary["oof_mAP"], result.files["html"])  # fmt: skip
    return result


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
    way = _WAYS[labels.ndim]  # class indices, or multi-hot rows (a multi-label manifest)
    way.check(labels, classes, folds, where)
    t0 = time.perf_counter()
    feats = extract_features(model, decoded, transform, device, precision,
                             channels_last=channels_last, progress=progress)  # fmt: skip
    t1 = time.perf_counter()
    probs = way.probabilities(feats, labels, classes, folds, seed, head)
    t2 = time.perf_counter()
    meta = {**(meta or {}), "folds": folds, "head": head, "seed": seed,
            "seconds": {"features": round(t1 - t0, 2), "heads": round(t2 - t1, 2)}}  # fmt: skip
    return way.audit(probs, labels, classes, decoded.paths, out, feats, max_distance, meta)


# ---------------------------------------------------------------------------------------------
# What differs between auditing one class per image and label sets


@dataclass(frozen=True)
class _AuditWay:
    check: Callable[[np.ndarray, Sequence[str], int, str], None]
    probabilities: Callable[..., np.ndarray]  # (features, labels, classes, folds, seed, head)
    audit: Callable[..., AuditResult]  # (probs, labels, classes, paths, out, features, ...)


def _one_label_probs(feats, labels, classes, folds, seed, head) -> np.ndarray:
    return out_of_fold_probabilities(feats, labels, len(classes), folds=folds, seed=seed, head=head)  # fmt: skip


def _label_set_probs(feats, hot, classes, folds, seed, head) -> np.ndarray:
    return out_of_fold_multilabel(feats, hot, folds=folds, seed=seed)  # one-vs-rest, no --head


def _one_label_audit(probs, labels, classes, paths, out, feats, max_distance, meta) -> AuditResult:
    return audit_probabilities(probs, labels, classes, paths, out, features=feats,
                               max_distance=max_distance, meta=meta)  # fmt: skip


def _label_set_audit(probs, hot, classes, paths, out, feats, max_distance, meta) -> AuditResult:
    return audit_multilabel(probs, hot, classes, paths, out, meta=meta)


# By the labels' dimensions: class indices (N,), or multi-hot rows (N, K) of label sets.
_WAYS = {
    1: _AuditWay(check_folds, _one_label_probs, _one_label_audit),
    2: _AuditWay(check_multilabel_folds, _label_set_probs, _label_set_audit),
}

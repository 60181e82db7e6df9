"""Validation and test: metrics on images the model has not seen, written where users look.

``evaluate("RUN", "DATA")`` (``resfit eval RUN DATA``) scores a run on a folder of class
folders, or on a data root's ``test/`` split, and writes ``RUN/eval-<name>/``: metrics.json,
per_class.csv (precision/recall/F1 from scikit-learn), confusion.csv and .png, predictions.csv.

The images go through the run's own evaluation preprocessing (its weights' resize and filter,
see :class:`resfit.data.augmentation.EvalPreprocessing`), and a file name that is not valid UTF-8 is
written as its bytes on disk (see :mod:`resfit.inference.predictor`), so one odd name never costs the
other rows.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import runs
from ..core.atomic import atomic_csv, atomic_path, atomic_write_json
from ..core.errors import ConfigError
from ..core.labels import ClassIndex, MultiHot
from ..data.datasets import DecodedImages, decode_all
from ..data.discovery import eval_samples
from ..data.paths import write_skipped
from ..inference.predictor import Predictor


@dataclass
class EvalResult:
    classes: list[str]
    y_true: np.ndarray
    logits: np.ndarray
    paths: list[str]
    accuracy: float
    top5: float
    n: int
    loss: float
    balanced_accuracy: float
    macro_f1: float
    per_class: list[dict]
    confusion: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    task_scores: dict[str, float] = field(default_factory=dict)  # the task's own (Task.eval_scores)
    slice_by: str | None = None  # --slice-by: the column or tag, and its slices' figures
    slices: list[dict] = field(default_factory=list)

    @property
    def y_pred(self) -> np.ndarray:
        return self.logits.argmax(1)

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "top5": self.top5,
            "n": self.n,
            "loss": self.loss,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "skipped": len(self.skipped),
            "per_class": self.per_class,
            **self.task_scores,
            **({"slice_by": self.slice_by, "slices": self.slices} if self.slice_by else {}),
        }

    def text_lines(self) -> list[str]:
        """What ``resfit eval`` prints: the scores, then one line per class."""
        lines = [f"accuracy {self.accuracy:.4f}  top-5 {self.top5:.4f}  balanced "
                 f"{self.balanced_accuracy:.4f}  macro-F1 {self.macro_f1:.4f}  n={self.n}"]  # fmt: skip
        lines += [f"  {r['class']:20s} precision {r['precision']:.3f} recall {r['recall']:.3f} "
                  f"f1 {r['f1']:.3f} n={r['support']}" for r in self.per_class]  # fmt: skip
        if self.slice_by:
            from .slices import slice_lines

            lines += slice_lines(self.slice_by, self.slices)
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s)")
        return lines


def compute_metrics(
    logits: Tensor, y_true: Tensor, classes: Sequence[str], paths: Sequence[str]
) -> EvalResult:
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    k = len(classes)
    y = y_true.numpy()
    pred = logits.argmax(1).numpy()
    topk = logits.topk(min(5, k), dim=1).indices.numpy()
    labels = list(range(k))
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = [
        {
            "class": c,
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    ]
    present = support > 0
    return EvalResult(
        classes=list(classes),
        y_true=y,
        logits=logits.numpy(),
        paths=list(paths),
        accuracy=float((pred == y).mean()) if len(y) else 0.0,
        top5=float((topk == y[:, None]).any(1).mean()) if len(y) else 0.0,
        n=int(len(y)),
        loss=float(F.cross_entropy(logits, y_true).item()) if len(y) else float("nan"),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)) if len(y) else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class=per_class,
        confusion=confusion_matrix(y, pred, labels=labels),
    )


@dataclass
class MultiLabelEvalResult:
    """Multi-label scores (scikit-learn): ``mAP`` (macro: the mean of the per-class APs over
    the classes present) and ``micro_mAP`` (every image-class pair as one ranking) need no
    threshold; ``micro_f1``, ``macro_f1``, ``exact_match`` (every label of an image right)
    and ``hamming_loss`` (the share of wrong image-class decisions) are at the run's
    thresholds on its calibrated probabilities. ``per_class``: AP, precision, recall, F1,
    support and threshold of each class."""

    classes: list[str]
    y_true: np.ndarray  # (N, K) 0/1
    logits: np.ndarray
    probs: np.ndarray  # calibrated
    thresholds: list[float]
    paths: list[str]
    mAP: float
    micro_mAP: float
    micro_f1: float
    macro_f1: float
    exact_match: float
    hamming_loss: float
    n: int
    per_class: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    task: str = "multilabel"
    task_scores: dict[str, float] = field(default_factory=dict)  # the task's own (Task.eval_scores)

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs >= np.asarray(self.thresholds)

    def summary(self) -> dict:
        keys = ("mAP", "micro_mAP", "micro_f1", "macro_f1", "exact_match", "hamming_loss", "n")
        return {"task": self.task, **{k: getattr(self, k) for k in keys},
                "skipped": len(self.skipped), "per_class": self.per_class, **self.task_scores}  # fmt: skip

    def text_lines(self) -> list[str]:
        """What ``resfit eval`` prints: the threshold-free and thresholded scores, then each
        class's AP, precision, recall and F1."""
        lines = [f"mAP {self.mAP:.4f}  micro-mAP {self.micro_mAP:.4f}  micro-F1 "
                 f"{self.micro_f1:.4f}  macro-F1 {self.macro_f1:.4f}  exact match "
                 f"{self.exact_match:.4f}  Hamming loss {self.hamming_loss:.4f}  n={self.n}"]  # fmt: skip
        for r in self.per_class:
            ap = "  -  " if r["ap"] is None else f"{r['ap']:.3f}"
            lines.append(f"  {r['class']:20s} AP {ap} precision {r['precision']:.3f} recall "
                         f"{r['recall']:.3f} f1 {r['f1']:.3f} n={r['support']}")  # fmt: skip
        return lines


def compute_multilabel_metrics(
    logits: Tensor,
    y_true: Tensor,
    classes: Sequence[str],
    paths: Sequence[str],
    temperature: float | Sequence[float] = 1.0,
    thresholds: Sequence[float] | None = None,
) -> MultiLabelEvalResult:
    """Score multi-label ``logits`` against multi-hot ``y_true`` (see
    :class:`MultiLabelEvalResult`); probabilities are ``sigmoid(logits / temperature)``."""
    from sklearn.metrics import average_precision_score, hamming_loss
    from sklearn.metrics import precision_recall_fscore_support as prfs

    from ..tasks.multi import MultiLabel, average_precisions

    k = len(classes)
    y = y_true.numpy() > 0.5
    probs = MultiLabel().probabilities(logits, temperature).numpy()
    thr = list(thresholds) if thresholds is not None else [0.5] * k
    pred = probs >= np.asarray(thr)
    aps = average_precisions(probs, y) if len(y) else [None] * k
    p, r, f1, support = prfs(y, pred, average=None, zero_division=0) if len(y) else ([0] * k,) * 4
    per_class = [
        {"class": c, "ap": aps[i], "precision": float(p[i]), "recall": float(r[i]),
         "f1": float(f1[i]), "support": int(support[i]), "threshold": float(thr[i])}
        for i, c in enumerate(classes)
    ]  # fmt: skip
    present = [i for i in range(k) if aps[i] is not None]
    micro = prfs(y, pred, average="micro", zero_division=0)[2] if len(y) else 0.0
    return MultiLabelEvalResult(
        classes=list(classes), y_true=y.astype(np.int64), logits=logits.numpy(), probs=probs,
        thresholds=thr, paths=list(paths),
        mAP=float(np.mean([aps[i] for i in present])) if present else 0.0,
        micro_mAP=float(average_precision_score(y, probs, average="micro")) if y.any() else 0.0,
        micro_f1=float(micro),
        macro_f1=float(np.mean([f1[i] for i in present])) if present else 0.0,
        exact_match=float((pred == y).all(1).mean()) if len(y) else 0.0,
        hamming_loss=float(hamming_loss(y, pred)) if len(y) else 0.0,
        n=int(len(y)), per_class=per_class,
    )  # fmt: skip


def write_multilabel_eval(res: MultiLabelEvalResult, out_dir: str | os.PathLike) -> Path:
    """``metrics.json``, ``per_class.csv`` and ``predictions.csv`` (path, true and predicted
    labels joined by ``;``, then each class's calibrated probability)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / runs.EVAL_METRICS, res.summary())
    with atomic_csv(out / "per_class.csv") as f:
        cols = ["class", "ap", "precision", "recall", "f1", "support", "threshold"]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(res.per_class)

    def names(row: np.ndarray) -> str:
        return ";".join(c for c, on in zip(res.classes, row, strict=True) if on)

    with atomic_csv(out / "predictions.csv") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", *res.classes])
        for path, t, pr, pb in zip(res.paths, res.y_true, res.y_pred, res.probs, strict=True):
            w.writerow([path, names(t), names(pr), *(f"{v:.6f}" for v in pb)])
    if res.skipped:
        write_skipped(out / runs.SKIPPED, res.skipped)
    return out


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = min(14, 2 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > thresh else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix[1:] or "png")
    plt.close(fig)


def write_eval(
    res: EvalResult, out_dir: str | os.PathLike, temperature: float | None = None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / runs.EVAL_METRICS, res.summary())
    with atomic_csv(out / "per_class.csv") as f:
        w = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        w.writeheader()
        w.writerows(res.per_class)
    with atomic_csv(out / "confusion.csv") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *res.classes])
        for c, row in zip(res.classes, res.confusion, strict=True):
            w.writerow([c, *row.tolist()])
    plot_confusion(res.confusion, res.classes, out / "confusion.png")
    probs = torch.softmax(torch.from_numpy(res.logits) / (temperature or 1.0), dim=1).numpy()
    with atomic_csv(out / "predictions.csv") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", "correct"])
        for path, t, pr in zip(res.paths, res.y_true, probs, strict=True):
            j = int(pr.argmax())
            w.writerow([path, res.classes[int(t)], res.classes[j], f"{pr[j]:.6f}", int(j == t)])
    if res.skipped:
        write_skipped(out / runs.SKIPPED, res.skipped)
    if res.slice_by:  # --slice-by: the figures per group (also in metrics.json)
        from .slices import SLICES_CSV, write_slices

        write_slices(out / SLICES_CSV, res.slice_by, res.slices)
    return out


def evaluate(
    run: str | os.PathLike,
    data: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = False,
    report: bool = True,
    engine: str = "auto",
    slice_by: str | None = None,
) -> EvalResult:
    """Score a run on labelled images it has not seen; writes RUN/eval-<data name>/.

    ``engine`` computes the logits, as for :meth:`Predictor.from_run` (``auto``: the fastest
    installed here). A multi-label run is scored on a ``path,labels[,split]`` manifest (its
    test rows, else all rows) or class folders, and returns a :class:`MultiLabelEvalResult`.
    ``slice_by``: a manifest column or DICOM tag; the figures per value go in ``slices``
    (``eval --json``), ``slices.csv`` and the text (one-label runs)."""
    predictor = Predictor.from_run(run, device=device, precision=precision, engine=engine)
    # How the labels are held picks the scores and files (one class per image, or label sets);
    # the task adds its own scores to either.
    how = _EVALUATIONS[type(predictor.task.coding)]
    return how(predictor, run, data, out, batch_size, progress, report, slice_by)


def _images_and_logits(
    predictor: Predictor, data, batch_size: int, progress: bool
) -> tuple[DecodedImages, Tensor, list[tuple[str, str]]]:
    """The evaluation images in the labels of the run's task, the model's logits on them, and
    every file skipped on the way (decoded with their labels: an unreadable file drops out
    together with its label)."""
    samples, skipped = eval_samples(data, predictor.classes, task=predictor.task.coding)
    decoded = decode_all(samples, predictor.base_size, progress=progress, window=predictor.window)
    return decoded, predictor.logits(decoded, batch_size), skipped + decoded.skipped


def _evaluate_one_label(
    predictor: Predictor, run, data, out, batch_size: int, progress: bool, report: bool,
    slice_by: str | None = None,
) -> EvalResult:  # fmt: skip
    decoded, logits, skipped = _images_and_logits(predictor, data, batch_size, progress)
    res = compute_metrics(
        logits, decoded.labels, predictor.classes, [str(p) for p in decoded.paths]
    )
    res.skipped = skipped
    res.task_scores = predictor.task.eval_scores(logits, decoded.labels)
    name = Path(data).name or "data"
    if slice_by:  # before write_eval, which writes them with the rest (metrics.json once)
        _add_slices(res, data, slice_by, predictor.temperature)
    out_dir = write_eval(res, out or runs.RunPaths(run).eval(name), predictor.temperature)
    if report:
        from .report import ReportData, write_report
        from .slices import slice_lines

        cfg = runs.read_config(run)
        history = []
        if runs.RunPaths(run).metrics.exists():
            with open(runs.RunPaths(run).metrics) as f:
                history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        write_report(
            out_dir / runs.REPORT,
            ReportData(
                title=f"{cfg['arch']} evaluated on {name}",
                class_names=res.classes,
                y_true=res.y_true,
                logits=res.logits,
                paths=res.paths,
                history=history,
                config=cfg,
                temperature=predictor.temperature,
                data_summary={
                    "counts": {"eval": _counts(res)},
                    "skipped": res.skipped,
                    "notes": slice_lines(res.slice_by, res.slices) if res.slice_by else [],
                },
                explain=predictor.explainer(),
                split=name,
            ),
        )
    return res


def _evaluate_multilabel(
    predictor: Predictor, run, data, out, batch_size: int, progress: bool, report: bool,
    slice_by: str | None = None,
) -> MultiLabelEvalResult:  # fmt: skip
    if slice_by:
        raise ConfigError("--slice-by gives one-label figures; this run predicts label sets")
    decoded, logits, skipped = _images_and_logits(predictor, data, batch_size, progress)
    res = compute_multilabel_metrics(
        logits, decoded.labels, predictor.classes, [str(p) for p in decoded.paths],
        predictor.temperature if predictor.temperature is not None else 1.0, predictor.thresholds,
    )  # fmt: skip
    res.skipped = skipped
    res.task_scores = predictor.task.eval_scores(logits, decoded.labels)
    name = Path(data).stem if Path(data).is_file() else Path(data).name or "data"
    out_dir = write_multilabel_eval(res, out or runs.RunPaths(run).eval(name))
    if report:
        from .report_multilabel import MultiLabelReportData, write_multilabel_report

        cfg = runs.read_config(run)
        write_multilabel_report(
            out_dir / runs.REPORT,
            MultiLabelReportData(f"{cfg['arch']} evaluated on {name}", res, predictor.explainer()),
        )
    return res


def _add_slices(res: EvalResult, data, column: str, temperature: float | None) -> None:
    """``res``'s figures per value of ``column`` (in ``res.slices``; :func:`write_eval` writes
    them), from the calibrated probabilities that ``predictions.csv`` holds."""
    from ..data.groups import read_values
    from .slices import slice_metrics

    values = read_values(data, [Path(p) for p in res.paths], column)
    probs = torch.softmax(torch.from_numpy(res.logits) / (temperature or 1.0), dim=1).numpy()
    res.slice_by, res.slices = column, slice_metrics(values, res.y_true, probs, res.classes)


_EVALUATIONS = {ClassIndex: _evaluate_one_label, MultiHot: _evaluate_multilabel}


def _counts(res: EvalResult) -> dict[str, int]:
    c = np.bincount(res.y_true, minlength=len(res.classes))
    return {name: int(c[i]) for i, name in enumerate(res.classes)}


__all__ = [
    "EvalResult",
    "MultiLabelEvalResult",
    "compute_metrics",
    "compute_multilabel_metrics",
    "evaluate",
    "write_eval",
    "write_multilabel_eval",
]

"""One self-contained HTML report of a training or evaluation run: where the model fails and
how sure it is.

``write_report(path, ReportData(...))`` writes a single ``report.html``: inline CSS, every
figure and thumbnail embedded as a base64 data URI, no script, no external address (a
Content-Security-Policy forbids fetching anything), so it opens offline, can be mailed and
archived. Every user-provided string (class names, paths, config values) is HTML-escaped, and
file-name bytes that are not UTF-8 are shown as ``\\xNN`` escapes (``data.display_text``), so
one odd file name cannot lose the report.

Sections (each an element with a stable id, see ``SECTION_IDS``): summary, loss/accuracy
curves, per-class metrics, confusion matrix, accuracy with a bootstrap interval, the most
confidently wrong images with Grad-CAM, calibration (reliability diagrams and ECE before and
after temperature scaling), the data summary and the resolved config.

``write_multilabel_report(path, MultiLabelReportData(...))`` writes the same kind of page for a
multi-label run (``MULTILABEL_SECTION_IDS``): the scores, the training curves, per-class AP,
precision, recall, F1 and threshold, a precision-recall curve per class, how often labels occur
together, and the worst false positives and false negatives, each with Grad-CAM for the class
concerned.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

from ..core.atomic import atomic_write_text
from ..data.paths import display_text
from ..runs import REPORT
from ..tasks.calibration import (
    Calibration,
    calibrate_temperature,
    expected_calibration_error,
    softmax,
)
from .calibration import bootstrap_accuracy_ci, reliability_diagram
from .html import (
    _CSP,
    _CSS,
    THUMB,
    _e,
    _finite,
    _img,
    _jpeg_uri,
    _pct,
    _png_uri,
    _section,
    _table,
    _thumbnail,
)

__all__ = ["IMBALANCE_RATIO", "SECTION_IDS", "TOP_WRONG", "ReportData", "write_report"]

SECTION_IDS = (
    "summary",
    "curves",
    "per-class",
    "confusion",
    "accuracy",
    "errors",
    "calibration",
    "data",
    "config",
)
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


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class _Metrics:
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


def _compute(data: ReportData) -> _Metrics:
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
    return _Metrics(
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


def _present_counts(summary: Mapping) -> dict[str, Mapping]:
    """The splits that have images: a split with none (no test split) does not exist."""
    counts = summary.get("counts") or {}
    return {sp: c for sp, c in counts.items() if sum(int(v) for v in c.values()) > 0}


def _counts_warnings(summary: Mapping) -> list[str]:
    warnings = []
    for split, counts in _present_counts(summary).items():
        values = [int(v) for v in counts.values()]
        empty = [c for c, v in counts.items() if int(v) == 0]
        if empty:
            warnings.append(f"{split}: no images for {', '.join(map(str, empty))}")
        nonzero = [v for v in values if v > 0]
        if nonzero and max(nonzero) / min(nonzero) >= IMBALANCE_RATIO:
            big = max(counts, key=lambda c: int(counts[c]))
            small = min((c for c in counts if int(counts[c]) > 0), key=lambda c: int(counts[c]))
            warnings.append(
                f"{split}: classes are very uneven ({big}: {counts[big]} vs {small}: "
                f"{counts[small]} images, ratio {max(nonzero) / min(nonzero):.1f}); "
                "watch the per-class recall and the balanced accuracy, not only the accuracy"
            )
    return warnings


def _dup_fields(d: object) -> dict[str, object]:
    if isinstance(d, Mapping):
        return dict(d)
    if hasattr(d, "to_dict"):
        return d.to_dict()
    return {
        "split_a": "",
        "path_a": str(d),
        "split_b": "",
        "path_b": "",
        "kind": "",
        "distance": "",
    }


def _skipped_fields(s: object) -> tuple[str, str]:
    if isinstance(s, Mapping):
        return str(s.get("path", "")), str(s.get("reason", ""))
    if isinstance(s, (tuple, list)) and len(s) == 2:
        return str(s[0]), str(s[1])
    return str(s), ""


def _summary_section(data: ReportData, m: _Metrics) -> str:
    n = len(m.y_true)
    cards = [
        ("accuracy", _pct(m.accuracy), f"95% CI {_pct(m.ci[0])} to {_pct(m.ci[1])}"),
        ("balanced accuracy", _pct(m.balanced_accuracy), "mean recall over classes"),
        (
            "macro F1",
            f"{m.macro_f1:.3f}" if math.isfinite(m.macro_f1) else "n/a",
            "classes weigh equally",
        ),
        (
            "ECE",
            f"{m.ece_after:.3f}",
            f"calibration error after T={m.temperature:.2f} (before {m.ece_before:.3f})",
        ),
        ("images", str(n), f"{data.split} split, {len(data.class_names)} classes"),
    ]
    html_cards = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div>'
        f'<div class="s">{_e(s)}</div></div>'
        for k, v, s in cards
    )
    warnings = _counts_warnings(data.data_summary)
    dups = data.data_summary.get("duplicates") or []
    if dups:
        warnings.append(
            f"{len(dups)} image(s) appear in more than one split (leakage): see the data section"
        )
    skipped = data.data_summary.get("skipped") or []
    if skipped:
        warnings.append(f"{len(skipped)} file(s) were skipped: see the data section")
    audit = data.data_summary.get("audit") or {}
    if audit.get("label_issues"):
        warnings.append(
            f"{audit['label_issues']} training label(s) look wrong: see the label audit in "
            "the data section"
        )
    if 0 < n < 100:
        warnings.append(
            f"only {n} images were evaluated: the accuracy is uncertain by several points"
        )
    if m.temperature_fitted_here:
        warnings.append(
            "the temperature was fitted on these same images, so 'after' calibration is optimistic"
        )
    warn_html = "".join(f'<p class="warn">&#9888; {_e(w)}</p>' for w in warnings)
    return _section("summary", "Summary", f'<div class="cards">{html_cards}</div>{warn_html}')


def _curves_section(history: list[dict]) -> str:
    if not history:
        return _section(
            "curves",
            "Training curves",
            "<p>No training history: this is an evaluation-only report.</p>",
        )
    epochs = [_finite(h.get("epoch", i + 1)) or (i + 1) for i, h in enumerate(history)]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [
                (e, _finite(h.get(f"{split}_{metric}")))
                for e, h in zip(epochs, history, strict=True)
            ]
            pts = [(e, v) for e, v in pts if v is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if metric == "loss" else "accuracy")
        ax.set_title("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    last = history[-1]
    best_val = max(
        (h for h in history if _finite(h.get("val_acc")) is not None),
        key=lambda h: float(h["val_acc"]),
        default=None,
    )
    notes = f"<p>{len(history)} epoch(s)."
    if best_val is not None:
        notes += f" Best validation accuracy {_pct(float(best_val['val_acc']))} at epoch {_e(best_val.get('epoch', '?'))}."
    tl, vl = _finite(last.get("train_loss")), _finite(last.get("val_loss"))
    if tl is not None and vl is not None and vl > 1.5 * tl and vl - tl > 0.2:
        notes += (
            " The validation loss is well above the training loss: the model may be overfitting."
        )
    notes += "</p>"
    return _section(
        "curves", "Training curves", _img(_png_uri(fig), "loss and accuracy curves", "fig") + notes
    )


def _per_class_section(data: ReportData, m: _Metrics) -> str:
    k = len(data.class_names)
    p, r, f1, support = precision_recall_fscore_support(
        m.y_true, m.y_pred, labels=np.arange(k), zero_division=0
    )
    rows = []
    for i, name in enumerate(data.class_names):
        cls = ' class="bad"' if support[i] and r[i] < 0.5 else ""
        rows.append(
            [
                f"<span{cls}>{_e(name)}</span>",
                f"{p[i]:.3f}",
                f"{r[i]:.3f}",
                f"{f1[i]:.3f}",
                str(int(support[i])),
            ]
        )
    table = _table(["class", "precision", "recall", "F1", "images"], rows, "num")
    text = (
        f"<p>Balanced accuracy <b>{_pct(m.balanced_accuracy)}</b>, macro-F1 <b>{m.macro_f1:.3f}</b>, "
        f"accuracy {_pct(m.accuracy)}. Precision: of the images called this class, the share that "
        "are; recall: of the images of this class, the share found. Recall under 50% is red.</p>"
    )
    return _section("per-class", "Per-class precision, recall and F1", text + table)


def _confusion_section(data: ReportData, m: _Metrics) -> str:
    k = len(data.class_names)
    cm = confusion_matrix(m.y_true, m.y_pred, labels=np.arange(k))
    rows_sum = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows_sum, out=np.zeros(cm.shape, float), where=rows_sum > 0)
    side = min(12.0, 2.5 + 0.45 * k)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [display_text(str(c)) for c in data.class_names]
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.6 else "black",
                )  # fmt: skip
    off = [(int(cm[i, j]), i, j) for i in range(k) for j in range(k) if i != j and cm[i, j] > 0]
    off.sort(reverse=True)
    common = "".join(
        f"<li>{_e(data.class_names[i])} &rarr; {_e(data.class_names[j])}: {n} image(s)</li>"
        for n, i, j in off[:5]
    )
    text = "<p>Rows: the true class; columns: the prediction; colour: share of the row.</p>"
    if common:
        text += f"<p>Most common mistakes (true &rarr; predicted):</p><ul>{common}</ul>"
    return _section(
        "confusion", "Confusion matrix", _img(_png_uri(fig), "confusion matrix", "fig") + text
    )


def _accuracy_section(data: ReportData, m: _Metrics) -> str:
    n = len(m.y_true)
    low, high = m.ci
    body = (
        f'<p class="big">{_pct(m.accuracy)} <span class="ci">95% interval {_pct(low)} to '
        f"{_pct(high)}</span></p><p>{int((m.y_true == m.y_pred).sum())} of {n} "
        f"{_e(data.split)} images right. The interval (1000 bootstrap resamples of these images) "
        "is how far the accuracy could move on another sample of the same size: differences "
        "between models smaller than it are not evidence.</p>"
    )
    return _section("accuracy", "Accuracy with a 95% bootstrap interval", body)


def _errors_section(data: ReportData, m: _Metrics) -> str:
    wrong = np.flatnonzero(m.y_true != m.y_pred)
    if len(wrong) == 0:
        return _section(
            "errors", "Most confidently wrong images", "<p>No mistakes on this split.</p>"
        )
    conf = m.probs[wrong, m.y_pred[wrong]]
    top = wrong[np.argsort(-conf, kind="stable")][:TOP_WRONG]
    have_paths = len(data.paths) == len(m.y_true)
    cards = []
    for i in top:
        pred, true = int(m.y_pred[i]), int(m.y_true[i])
        pics = []
        path = str(data.paths[i]) if have_paths else None
        if path is not None:
            thumb = _thumbnail(path)
            pics.append(
                _img(_jpeg_uri(thumb), "image", "thumb")
                if thumb
                else '<div class="missing">image not readable</div>'
            )
            if data.explain is not None:
                try:
                    overlay = data.explain(path, pred)
                    overlay = overlay.copy()
                    overlay.thumbnail((THUMB, THUMB))
                    pics.append(
                        _img(_jpeg_uri(overlay), "Grad-CAM for the predicted class", "thumb")
                    )
                except Exception as e:  # an explanation failing must not lose the report
                    pics.append(
                        f'<div class="missing">Grad-CAM failed: {_e(type(e).__name__)}</div>'
                    )
        name = Path(path).name if path else f"#{i}"
        cards.append(
            f'<figure class="wrong">{"".join(pics)}<figcaption><b title="{_e(path or "")}">{_e(name)}</b><br>'
            f"true: {_e(data.class_names[true])} ({_pct(float(m.probs[i, true]))})<br>"
            f'predicted: <span class="bad">{_e(data.class_names[pred])}</span> '
            f"({_pct(float(m.probs[i, pred]))})</figcaption></figure>"
        )
    text = (
        f"<p>{len(wrong)} mistake(s); the {len(top)} the model was surest about "
        "(calibrated probability of the wrong class). "
        + (
            "Left: the photo; right: what the model saw, with Grad-CAM for the predicted class "
            "(red = the regions that drove the mistake). "
            if data.explain
            else ""
        )
        + "Check these first: mislabelled images, ambiguous classes, or a shortcut the model learned.</p>"
    )
    return _section(
        "errors",
        "Most confidently wrong images",
        text + f'<div class="gallery">{"".join(cards)}</div>',
    )


def _calibration_section(data: ReportData, m: _Metrics) -> str:
    fig = Figure(figsize=(10, 4.4))
    ax_b, ax_a = fig.subplots(1, 2)
    reliability_diagram(m.probs_raw, m.y_true, ax_b, title="before (T = 1)", label="before")
    reliability_diagram(
        m.probs, m.y_true, ax_a, title=f"after temperature scaling (T = {m.temperature:.2f})",
        label="after", color="tab:orange",
    )  # fmt: skip
    n = max(len(m.y_true), 1)
    eps = 1e-12
    nll_b = float(-np.log(m.probs_raw[np.arange(len(m.y_true)), m.y_true] + eps).sum() / n)
    nll_a = float(-np.log(m.probs[np.arange(len(m.y_true)), m.y_true] + eps).sum() / n)
    rows = [
        ["before (T = 1)", f"{m.ece_before:.4f}", f"{nll_b:.4f}"],
        [f"after (T = {m.temperature:.3f})", f"{m.ece_after:.4f}", f"{nll_a:.4f}"],
    ]
    where = (
        "fitted on these same images (optimistic: fit it on the validation set)"
        if m.temperature_fitted_here
        else "fitted on the validation set"
    )
    mood = (
        "over-confident (probabilities too close to 0 and 1)"
        if m.temperature > 1.1
        else "under-confident"
        if m.temperature < 0.9
        else "about right"
    )
    text = f"<p>Temperature {m.temperature:.3f}, {_e(where)}: the raw model was {mood}. "
    if m.calibration_note:  # the note says whether the fitted T was kept, and why
        text = f"<p>Temperature {m.temperature:.3f}: {_e(m.calibration_note)} ({_e(where)}). "
    text += (
        "ECE: the average gap between the confidence the model states and how often it is "
        "right (0 is perfect). Scaling by T never changes a prediction, only how sure it is.</p>"
    )
    return _section(
        "calibration",
        "Calibration",
        text
        + _table(["", "ECE", "NLL"], rows, "num")
        + _img(_png_uri(fig), "reliability diagrams", "fig"),
    )


def _data_section(data: ReportData) -> str:
    s = data.data_summary
    parts = [
        f"<p>Classes ({len(data.class_names)}): {', '.join(_e(c) for c in data.class_names)}</p>"
    ]
    counts = _present_counts(s)
    if counts:
        splits = list(counts)
        classes = list(
            dict.fromkeys(
                [*map(str, data.class_names), *(str(c) for sp in splits for c in counts[sp])]
            )
        )
        rows = [[_e(c), *(str(counts[sp].get(c, 0)) for sp in splits)] for c in classes]
        rows.append(
            [
                "<b>total</b>",
                *(f"<b>{sum(int(v) for v in counts[sp].values())}</b>" for sp in splits),
            ]
        )
        parts.append(_table(["class", *(_e(sp) for sp in splits)], rows, "num"))
    for w in _counts_warnings(s):
        parts.append(f'<p class="warn">&#9888; {_e(w)}</p>')

    skipped = s.get("skipped") or []
    if skipped:
        rows = [[_e(p), _e(r)] for p, r in map(_skipped_fields, skipped[:200])]
        more = f"<p>... and {len(skipped) - 200} more.</p>" if len(skipped) > 200 else ""
        parts.append(
            f"<h3>Skipped files ({len(skipped)})</h3>" + _table(["file", "reason"], rows) + more
        )
    else:
        parts.append("<p>No files were skipped.</p>")

    dups = s.get("duplicates")
    if dups:
        rows = []
        for d in dups[:200]:
            f = _dup_fields(d)
            rows.append(
                [
                    _e(f.get("kind", "")),
                    _e(f.get("distance", "")),
                    _e(f.get("split_a", "")),
                    _e(f.get("path_a", "")),
                    _e(f.get("split_b", "")),
                    _e(f.get("path_b", "")),
                ]
            )
        more = f"<p>... and {len(dups) - 200} more.</p>" if len(dups) > 200 else ""
        parts.append(
            f'<h3>Images in more than one split ({len(dups)})</h3><p class="warn">&#9888; The same '
            "picture in training and evaluation data inflates the accuracy. exact = identical "
            "files; near = the same picture re-encoded, resized or edited (distance: differing "
            "bits of 64 in the perceptual hash).</p>"
            + _table(["kind", "distance", "split", "file", "split", "file"], rows)
            + more
        )
    elif dups is not None:
        parts.append("<p>No image appears in more than one split.</p>")
    for note in s.get("notes") or []:
        parts.append(f"<p>{_e(note)}</p>")
    parts.append(_audit_link(s.get("audit")))
    return _section("data", "Data", "\n".join(parts))


def _audit_link(audit: Mapping | None) -> str:
    """``--audit``: what the label audit found, and a link to its page (beside this report)."""
    if not audit:
        return ""
    links = (f'<a href="{_e(audit.get("html", ""))}">the audit, with thumbnails</a>, and '
             f'<a href="{_e(audit.get("csv", ""))}">label_issues.csv</a>.</p>')  # fmt: skip
    if audit.get("task") == "multilabel":
        return (f"<h3>Label audit</h3><p>{int(audit.get('label_issues', 0))} of "
                f"{int(audit.get('images', 0))} training images have labels that look missing or "
                f"extra (out-of-fold mAP {float(audit.get('oof_mAP', 0)):.3f}): {links}")  # fmt: skip
    return (
        f"<h3>Label audit</h3><p>{int(audit.get('label_issues', 0))} of "
        f"{int(audit.get('images', 0))} training labels look wrong (confident learning on "
        f"out-of-fold probabilities), {len(audit.get('near_duplicate_conflicts', []))} "
        f"near-duplicate pair(s) carry different labels, {int(audit.get('outliers', 0))} "
        f"outlier(s): {links}"
    )


def _config_section(config: Mapping) -> str:
    text = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return _section("config", "Resolved configuration", f"<pre>{_e(text)}</pre>")


def write_report(path: str | os.PathLike, data: ReportData) -> Path:
    """Write the report; returns the file written.

    ``path``: a ``.html`` file, or a folder (created) that gets ``report.html``.
    """
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)

    m = _compute(data)
    sections = [
        _summary_section(data, m),
        _curves_section(list(data.history)),
        _per_class_section(data, m),
        _confusion_section(data, m),
        _accuracy_section(data, m),
        _errors_section(data, m),
        _calibration_section(data, m),
        _data_section(data),
        _config_section(data.config),
    ]
    titles = {
        "summary": "Summary", "curves": "Curves", "per-class": "Per class",
        "confusion": "Confusion", "accuracy": "Accuracy", "errors": "Mistakes",
        "calibration": "Calibration", "data": "Data", "config": "Config",
    }  # fmt: skip
    nav = "".join(f'<a href="#{sid}">{titles[sid]}</a>' for sid in SECTION_IDS)
    try:
        from importlib.metadata import version

        ver = version("resfit")
    except Exception:  # not installed (running from a source tree)
        ver = "dev"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(data.title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header><h1>{_e(data.title)}</h1><p>{len(m.y_true)} {_e(data.split)} images, {len(data.class_names)} classes</p></header>
<nav>{nav}</nav>
{chr(10).join(sections)}
<footer>resfit {_e(ver)} &middot; {_e(now)}</footer>
</main>
</body>
</html>
"""
    # Every user string went through _e; the error handler is the last guard for the report.
    atomic_write_text(out, doc, errors="backslashreplace")  # never half a report
    return out

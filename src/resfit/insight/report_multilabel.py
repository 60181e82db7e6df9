"""The HTML report of a multi-label run: mAP and per-class AP, precision-recall curves, label
co-occurrence, and the images with the most missing or extra labels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..core.atomic import atomic_write_text
from ..data.paths import display_text
from ..runs import REPORT
from .html import (
    CSP,
    CSS,
    THUMB,
    escape,
    finite,
    img,
    jpeg_uri,
    pct,
    png_uri,
    section,
    table,
    thumbnail,
)
from .report_data import TOP_WRONG
from .report_sections import audit_link

__all__ = ["MULTILABEL_SECTION_IDS", "MultiLabelReportData", "write_multilabel_report"]


# ---------------------------------------------------------------------------------------------
# Multi-label runs

MULTILABEL_SECTION_IDS = ("summary", "curves", "per-class", "pr-curves", "co-occurrence",
                          "false-positives", "false-negatives")  # fmt: skip


@dataclass
class MultiLabelReportData:
    """What a multi-label report shows: a :class:`resfit.insight.evaluation.MultiLabelEvalResult`
    (labels, calibrated probabilities, thresholds, scores), a Grad-CAM maker
    (path, class index -> PIL image) or None, the training history and notes."""

    title: str
    result: object  # evaluation.MultiLabelEvalResult (evaluation imports this module's users)
    explain: Callable | None = None
    history: Sequence[Mapping] = ()
    notes: Sequence[str] = ()
    audit: Mapping | None = None  # --audit: the label audit's summary with html/csv links


def _ml_summary(r) -> str:
    prevalence = r.y_true.mean(0) if len(r.y_true) else np.zeros(len(r.classes))
    cards = [("mAP (macro)", f"{r.mAP:.3f}", f"constant guess: {prevalence.mean():.3f}"),
             ("micro-mAP", f"{r.micro_mAP:.3f}", "all image-class pairs ranked together"),
             ("micro-F1", f"{r.micro_f1:.3f}", "at the tuned thresholds"),
             ("macro-F1", f"{r.macro_f1:.3f}", "mean over classes"),
             ("exact match", pct(r.exact_match), "every label of the image right"),
             ("Hamming loss", f"{r.hamming_loss:.3f}", "share of wrong image-class decisions")]  # fmt: skip
    body = "".join(f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{v}</div>'
                   f'<div class="s">{escape(sub)}</div></div>' for k, v, sub in cards)  # fmt: skip
    return section("summary", "Summary", f'<div class="cards">{body}</div>'
                    "<p>A constant guess (each class's frequency as its score) gets a macro AP "
                    "equal to the mean label prevalence.</p>")  # fmt: skip


def _ml_curves(history: Sequence[Mapping]) -> str:
    if not history:
        return section("curves", "Training curves", "<p>No training history.</p>")
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_map = fig.subplots(1, 2)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for key, ax in (("train_loss", ax_loss), ("val_loss", ax_loss), ("val_mAP", ax_map)):
        ys = [finite(h.get(key)) for h in history]
        pts = [(e, y) for e, y in zip(epochs, ys, strict=True) if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "-o", ms=3, label=key)
    for ax, title in ((ax_loss, "loss"), (ax_map, "validation mAP")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return section("curves", "Training curves", img(png_uri(fig), "curves", "fig"))


def _ml_per_class(r) -> str:
    rows = [[escape(c["class"]), "-" if c["ap"] is None else f"{c['ap']:.3f}",
             f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
             str(c["support"]), f"{c['threshold']:.3f}"] for c in r.per_class]  # fmt: skip
    head = ["class", "AP", "precision", "recall", "F1", "images with it", "threshold"]
    return section("per-class", "Per class", table(head, rows, "num"))


def _ml_pr_curves(r) -> str:
    from sklearn.metrics import precision_recall_curve

    k = len(r.classes)
    cols = min(4, max(k, 1))
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(3.2 * cols, 2.9 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for j, ax in enumerate(axes):
        if j >= k:
            ax.set_axis_off()
            continue
        y = r.y_true[:, j] > 0
        if y.any():
            prec, rec, _ = precision_recall_curve(y, r.probs[:, j])
            ax.plot(rec, prec)
            ax.axhline(y.mean(), color="gray", ls=":", lw=1)  # a constant guess
            t = r.probs[:, j] >= r.thresholds[j]
            tp = (t & y).sum()
            if t.any():
                ax.plot(tp / y.sum(), tp / t.sum(), "o", color="tab:red")
        ax.set_title(f"{display_text(r.classes[j])[:24]}", fontsize=9)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    text = ("<p>Precision against recall as the threshold moves; the red dot is the tuned "
            "threshold, the dotted line the class's prevalence (a constant guess).</p>")  # fmt: skip
    return section("pr-curves", "Precision-recall per class",
                    text + img(png_uri(fig), "precision-recall curves", "fig"))  # fmt: skip


def _ml_cooccurrence(r) -> str:
    y = r.y_true.astype(np.int64)
    co = y.T @ y  # diagonal: images with the class
    k = len(r.classes)
    fig = Figure(figsize=(min(12, 2 + 0.5 * k),) * 2)
    ax = fig.subplots()
    ax.imshow(co, cmap="Blues")
    names = [display_text(c) for c in r.classes]
    ax.set_xticks(range(k), names, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                dark = co[i, j] > co.max() / 2
                ax.text(j, i, str(co[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    fig.tight_layout()
    counts = np.bincount(y.sum(1), minlength=1)
    per = ", ".join(f"{n} label(s): {c}" for n, c in enumerate(counts) if c)
    return section("co-occurrence", "Label co-occurrence",
                    f"<p>Images that carry both classes (diagonal: the images with the class). "
                    f"Labels per image: {escape(per)}.</p>" + img(png_uri(fig), "co-occurrence", "fig"))  # fmt: skip


def _ml_card(data: MultiLabelReportData, i: int, j: int, kind: str) -> str:
    r = data.result
    path = str(r.paths[i]) if len(r.paths) > i else ""
    pics = []
    thumb = thumbnail(path) if path else None
    pics.append(img(jpeg_uri(thumb), "image", "thumb") if thumb
                else '<div class="missing">image not readable</div>')  # fmt: skip
    if data.explain is not None and path:
        try:
            overlay = data.explain(path, j).copy()
            overlay.thumbnail((THUMB, THUMB))
            pics.append(img(jpeg_uri(overlay), f"Grad-CAM for {r.classes[j]}", "thumb"))
        except Exception as e:  # an explanation failing must not lose the report
            pics.append(f'<div class="missing">Grad-CAM failed: {escape(type(e).__name__)}</div>')
    true = ";".join(c for c, on in zip(r.classes, r.y_true[i], strict=True) if on) or "(none)"
    return (f'<figure class="wrong">{"".join(pics)}<figcaption><b title="{escape(path)}">'
            f"{escape(Path(path).name or i)}</b><br>{kind}: <span class=\"bad\">{escape(r.classes[j])}"
            f"</span> (p = {r.probs[i, j]:.2f}, threshold {r.thresholds[j]:.2f})<br>"
            f"labels: {escape(true)}</figcaption></figure>")  # fmt: skip


def _ml_errors(data: MultiLabelReportData, positive: bool) -> str:
    """The worst false positives (absent, highest probability) or false negatives (present,
    lowest probability), with Grad-CAM for that class."""
    r = data.result
    y, pred = r.y_true > 0, r.y_pred
    wrong = (pred & ~y) if positive else (~pred & y)
    ii, jj = np.nonzero(wrong)
    sid = "false-positives" if positive else "false-negatives"
    title = "Worst false positives" if positive else "Worst false negatives"
    if len(ii) == 0:
        return section(sid, title, "<p>None on this split.</p>")
    score = r.probs[ii, jj]
    order = np.argsort(-score if positive else score, kind="stable")[:TOP_WRONG]
    kind = "predicted, absent" if positive else "present, missed"
    cards = [_ml_card(data, int(ii[o]), int(jj[o]), kind) for o in order]
    text = (f"<p>{len(ii)} {'false positive' if positive else 'false negative'} image-class "
            f"pair(s); the {len(order)} with the {'highest' if positive else 'lowest'} "
            "probability. Right of each photo: Grad-CAM for the class concerned.</p>")  # fmt: skip
    return section(sid, title, text + f'<div class="gallery">{"".join(cards)}</div>')


def write_multilabel_report(path: str | os.PathLike, data: MultiLabelReportData) -> Path:
    """Write a multi-label run's report (one self-contained HTML file); returns its path."""
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    r = data.result
    sections = [_ml_summary(r), _ml_curves(data.history), _ml_per_class(r), _ml_pr_curves(r),
                _ml_cooccurrence(r), _ml_errors(data, True), _ml_errors(data, False)]  # fmt: skip
    notes = "".join(f"<p>{escape(n)}</p>" for n in data.notes) + audit_link(data.audit)
    nav = "".join(f'<a href="#{sid}">{sid.replace("-", " ")}</a>' for sid in MULTILABEL_SECTION_IDS)
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{escape(data.title)}</title><style>{CSS}</style></head>
<body><main>
<header><h1>{escape(data.title)}</h1><p>{r.n} images, {len(r.classes)} classes, multi-label</p>{notes}</header>
<nav>{nav}</nav>
{chr(10).join(sections)}
</main></body></html>
"""
    atomic_write_text(out, doc, errors="backslashreplace")
    return out

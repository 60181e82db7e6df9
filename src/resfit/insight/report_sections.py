"""The sections of the single-label report (:func:`resfit.insight.report.write_report`): each
returns one ``<section>`` with a stable id (``SECTION_IDS``), every user string escaped."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    confusion_matrix,
    precision_recall_fscore_support,
)

from ..data.paths import display_text
from .calibration import reliability_diagram
from .html import (
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
from .report_data import IMBALANCE_RATIO, TOP_WRONG, Metrics, ReportData


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


def summary_section(data: ReportData, m: Metrics) -> str:
    n = len(m.y_true)
    cards = [
        ("accuracy", pct(m.accuracy), f"95% CI {pct(m.ci[0])} to {pct(m.ci[1])}"),
        ("balanced accuracy", pct(m.balanced_accuracy), "mean recall over classes"),
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
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{v}</div>'
        f'<div class="s">{escape(s)}</div></div>'
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
    warn_html = "".join(f'<p class="warn">&#9888; {escape(w)}</p>' for w in warnings)
    return section("summary", "Summary", f'<div class="cards">{html_cards}</div>{warn_html}')


def curves_section(history: list[dict]) -> str:
    if not history:
        return section(
            "curves",
            "Training curves",
            "<p>No training history: this is an evaluation-only report.</p>",
        )
    epochs = [finite(h.get("epoch", i + 1)) or (i + 1) for i, h in enumerate(history)]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [
                (e, finite(h.get(f"{split}_{metric}")))
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
        (h for h in history if finite(h.get("val_acc")) is not None),
        key=lambda h: float(h["val_acc"]),
        default=None,
    )
    notes = f"<p>{len(history)} epoch(s)."
    if best_val is not None:
        notes += f" Best validation accuracy {pct(float(best_val['val_acc']))} at epoch {escape(best_val.get('epoch', '?'))}."
    tl, vl = finite(last.get("train_loss")), finite(last.get("val_loss"))
    if tl is not None and vl is not None and vl > 1.5 * tl and vl - tl > 0.2:
        notes += (
            " The validation loss is well above the training loss: the model may be overfitting."
        )
    notes += "</p>"
    return section(
        "curves", "Training curves", img(png_uri(fig), "loss and accuracy curves", "fig") + notes
    )


def per_class_section(data: ReportData, m: Metrics) -> str:
    k = len(data.class_names)
    p, r, f1, support = precision_recall_fscore_support(
        m.y_true, m.y_pred, labels=np.arange(k), zero_division=0
    )
    rows = []
    for i, name in enumerate(data.class_names):
        cls = ' class="bad"' if support[i] and r[i] < 0.5 else ""
        rows.append(
            [
                f"<span{cls}>{escape(name)}</span>",
                f"{p[i]:.3f}",
                f"{r[i]:.3f}",
                f"{f1[i]:.3f}",
                str(int(support[i])),
            ]
        )
    rows_html = table(["class", "precision", "recall", "F1", "images"], rows, "num")
    text = (
        f"<p>Balanced accuracy <b>{pct(m.balanced_accuracy)}</b>, macro-F1 <b>{m.macro_f1:.3f}</b>, "
        f"accuracy {pct(m.accuracy)}. Precision: of the images called this class, the share that "
        "are; recall: of the images of this class, the share found. Recall under 50% is red.</p>"
    )
    return section("per-class", "Per-class precision, recall and F1", text + rows_html)


def confusion_section(data: ReportData, m: Metrics) -> str:
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
        f"<li>{escape(data.class_names[i])} &rarr; {escape(data.class_names[j])}: {n} image(s)</li>"
        for n, i, j in off[:5]
    )
    text = "<p>Rows: the true class; columns: the prediction; colour: share of the row.</p>"
    if common:
        text += f"<p>Most common mistakes (true &rarr; predicted):</p><ul>{common}</ul>"
    return section(
        "confusion", "Confusion matrix", img(png_uri(fig), "confusion matrix", "fig") + text
    )


def accuracy_section(data: ReportData, m: Metrics) -> str:
    n = len(m.y_true)
    low, high = m.ci
    body = (
        f'<p class="big">{pct(m.accuracy)} <span class="ci">95% interval {pct(low)} to '
        f"{pct(high)}</span></p><p>{int((m.y_true == m.y_pred).sum())} of {n} "
        f"{escape(data.split)} images right. The interval (1000 bootstrap resamples of these images) "
        "is how far the accuracy could move on another sample of the same size: differences "
        "between models smaller than it are not evidence.</p>"
    )
    return section("accuracy", "Accuracy with a 95% bootstrap interval", body)


def errors_section(data: ReportData, m: Metrics) -> str:
    wrong = np.flatnonzero(m.y_true != m.y_pred)
    if len(wrong) == 0:
        return section(
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
            thumb = thumbnail(path)
            pics.append(
                img(jpeg_uri(thumb), "image", "thumb")
                if thumb
                else '<div class="missing">image not readable</div>'
            )
            if data.explain is not None:
                try:
                    overlay = data.explain(path, pred)
                    overlay = overlay.copy()
                    overlay.thumbnail((THUMB, THUMB))
                    pics.append(img(jpeg_uri(overlay), "Grad-CAM for the predicted class", "thumb"))
                except Exception as e:  # an explanation failing must not lose the report
                    pics.append(
                        f'<div class="missing">Grad-CAM failed: {escape(type(e).__name__)}</div>'
                    )
        name = Path(path).name if path else f"#{i}"
        cards.append(
            f'<figure class="wrong">{"".join(pics)}<figcaption><b title="{escape(path or "")}">{escape(name)}</b><br>'
            f"true: {escape(data.class_names[true])} ({pct(float(m.probs[i, true]))})<br>"
            f'predicted: <span class="bad">{escape(data.class_names[pred])}</span> '
            f"({pct(float(m.probs[i, pred]))})</figcaption></figure>"
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
    return section(
        "errors",
        "Most confidently wrong images",
        text + f'<div class="gallery">{"".join(cards)}</div>',
    )


def calibration_section(data: ReportData, m: Metrics) -> str:
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
    text = f"<p>Temperature {m.temperature:.3f}, {escape(where)}: the raw model was {mood}. "
    if m.calibration_note:  # the note says whether the fitted T was kept, and why
        text = (
            f"<p>Temperature {m.temperature:.3f}: {escape(m.calibration_note)} ({escape(where)}). "
        )
    text += (
        "ECE: the average gap between the confidence the model states and how often it is "
        "right (0 is perfect). Scaling by T never changes a prediction, only how sure it is.</p>"
    )
    return section(
        "calibration",
        "Calibration",
        text
        + table(["", "ECE", "NLL"], rows, "num")
        + img(png_uri(fig), "reliability diagrams", "fig"),
    )


def _counts_table(data: ReportData) -> list[str]:
    """Images per class and split, with the totals (none when no split has images)."""
    counts = _present_counts(data.data_summary)
    if not counts:
        return []
    splits = list(counts)
    classes = list(
        dict.fromkeys([*map(str, data.class_names), *(str(c) for sp in splits for c in counts[sp])])
    )
    rows = [[escape(c), *(str(counts[sp].get(c, 0)) for sp in splits)] for c in classes]
    rows.append(
        [
            "<b>total</b>",
            *(f"<b>{sum(int(v) for v in counts[sp].values())}</b>" for sp in splits),
        ]
    )
    return [table(["class", *(escape(sp) for sp in splits)], rows, "num")]


def _skipped_html(skipped: list) -> str:
    """The files that could not be read, and why (the first 200)."""
    if skipped:
        rows = [[escape(p), escape(r)] for p, r in map(_skipped_fields, skipped[:200])]
        more = f"<p>... and {len(skipped) - 200} more.</p>" if len(skipped) > 200 else ""
        return f"<h3>Skipped files ({len(skipped)})</h3>" + table(["file", "reason"], rows) + more
    return "<p>No files were skipped.</p>"


def _duplicates_html(dups: list | None) -> list[str]:
    """The images found in more than one split (the first 200); None: not checked."""
    if dups:
        rows = []
        for d in dups[:200]:
            f = _dup_fields(d)
            rows.append(
                [
                    escape(f.get("kind", "")),
                    escape(f.get("distance", "")),
                    escape(f.get("split_a", "")),
                    escape(f.get("path_a", "")),
                    escape(f.get("split_b", "")),
                    escape(f.get("path_b", "")),
                ]
            )
        more = f"<p>... and {len(dups) - 200} more.</p>" if len(dups) > 200 else ""
        return [
            f'<h3>Images in more than one split ({len(dups)})</h3><p class="warn">&#9888; The same '
            "picture in training and evaluation data inflates the accuracy. exact = identical "
            "files; near = the same picture re-encoded, resized or edited (distance: differing "
            "bits of 64 in the perceptual hash).</p>"
            + table(["kind", "distance", "split", "file", "split", "file"], rows)
            + more
        ]
    if dups is not None:
        return ["<p>No image appears in more than one split.</p>"]
    return []


def data_section(data: ReportData) -> str:
    s = data.data_summary
    parts = [
        f"<p>Classes ({len(data.class_names)}): {', '.join(escape(c) for c in data.class_names)}</p>"
    ]
    parts += _counts_table(data)
    for w in _counts_warnings(s):
        parts.append(f'<p class="warn">&#9888; {escape(w)}</p>')

    parts.append(_skipped_html(s.get("skipped") or []))
    parts += _duplicates_html(s.get("duplicates"))
    for note in s.get("notes") or []:
        parts.append(f"<p>{escape(note)}</p>")
    parts.append(audit_link(s.get("audit")))
    return section("data", "Data", "\n".join(parts))


def audit_link(audit: Mapping | None) -> str:
    """``--audit``: what the label audit found, and a link to its page (beside this report)."""
    if not audit:
        return ""
    links = (f'<a href="{escape(audit.get("html", ""))}">the audit, with thumbnails</a>, and '
             f'<a href="{escape(audit.get("csv", ""))}">label_issues.csv</a>.</p>')  # fmt: skip
    # The audit says what it found in words that fit its kind of labels (quality/ writes it).
    headline = audit.get("headline") or f"{int(audit.get('label_issues', 0))} label issue(s)"
    return f"<h3>Label audit</h3><p>{escape(headline)}: {links}"


def config_section(config: Mapping) -> str:
    text = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return section("config", "Resolved configuration", f"<pre>{escape(text)}</pre>")


def _cell(v: object, fmt: str) -> str:
    f = finite(v)
    return fmt.format(f) if f is not None else "–"


def deploy_section(deploy: Mapping) -> str:
    """``resfit bench deploy``'s table: each small-device format and precision against the
    run's PyTorch model on the validation split, as measured on the machine it names."""
    header = ["format", "precision", "size (MB)", "top-1 change", "ECE change", "agreement",
              "batch 1, 1 thread (ms)", f"batch 1, {deploy.get('threads')} threads (ms)",
              "images/s"]  # fmt: skip
    rows = [
        [escape(str(r.get("format"))), escape(str(r.get("precision"))),
         _cell(r.get("size_mb"), "{:.2f}"), _cell(r.get("top1_change"), "{:+.2%}"),
         _cell(r.get("ece_change"), "{:+.4f}"), _cell(r.get("agreement"), "{:.1%}"),
         _cell(r.get("latency_1t_ms"), "{:.2f}"), _cell(r.get("latency_all_ms"), "{:.2f}"),
         _cell(r.get("images_per_s"), "{:.0f}")]
        for r in deploy.get("rows", [])
    ]  # fmt: skip
    intro = (
        f"<p>Measured by <code>resfit bench deploy</code> on {escape(str(deploy.get('machine')))}"
        f" on {deploy.get('val_images')} images ({escape(str(deploy.get('val_source')))}); "
        f"changes are against PyTorch fp32 (accuracy {_cell(deploy.get('accuracy'), '{:.2%}')},"
        f" ECE {_cell(deploy.get('ece'), '{:.4f}')}). CoreML runs only on Apple systems: its "
        "size is shown, never a measurement.</p>"
    )
    notes = "".join(f"<li>{escape(str(r['format']))} {escape(str(r['precision']))}: "
                    f"{escape(str(r['note']))}</li>" for r in deploy.get("rows", []) if r.get("note"))  # fmt: skip
    return section(
        "deploy", "Deploy", intro + table(header, rows) + (f"<ul>{notes}</ul>" if notes else "")
    )

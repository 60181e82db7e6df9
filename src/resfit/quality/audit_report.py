"""The audit's files: ``label_issues.csv`` (most likely wrong first), ``audit.json`` (the
summary) and ``audit.html`` (thumbnails in that order, self-contained like the run report).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.atomic import atomic_csv, atomic_write_text

if TYPE_CHECKING:  # torch only where features are computed
    pass

__all__ = ["KIND_ORDER", "Issue", "audit_summary", "write_audit"]
HTML_LIMIT = 300  # thumbnails in audit.html; the CSV has every row
KIND_ORDER = {"label": 0, "near-duplicate": 1, "outlier": 2, "missing": 0, "extra": 0}


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


def audit_summary(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], issues: list[Issue],
    flagged: np.ndarray, dups: list, outlying: np.ndarray, meta: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    pairs = Counter((r.given, r.suggested) for r in issues if "label" in r.kind.split("+"))
    per_class = Counter(classes[labels[i]] for i in flagged.tolist())
    headline = (f"{len(flagged)} of {len(labels)} training labels look wrong (confident learning "
                f"on out-of-fold probabilities), {len(dups)} near-duplicate pair(s) carry "
                f"different labels, {len(outlying)} outlier(s)")  # fmt: skip
    return {
        "headline": headline,
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
    with atomic_csv(csv_path) as f:
        w = csv.writer(f)
        w.writerow(["path", "given", "suggested", "score", "kind", "detail"])
        for r in issues:
            w.writerow([r.path, r.given, r.suggested, f"{r.score:.4f}", r.kind, r.detail])
    json_path = out / "audit.json"
    atomic_write_text(json_path, json.dumps(summary, indent=2, default=str))
    html_path = write_audit_html(out / "audit.html", issues, summary)
    return {"csv": csv_path, "html": html_path, "json": json_path}


def _issue_card(r: Issue) -> str:
    from ..insight.html import escape, img, jpeg_uri, thumbnail

    thumb = thumbnail(r.path) if not r.path.startswith("#") else None
    pic = (img(jpeg_uri(thumb), "image", "thumb") if thumb
           else '<div class="missing">image not readable</div>')  # fmt: skip
    fix = f'<br>suggested: <span class="bad">{escape(r.suggested)}</span>' if r.suggested else ""
    detail = f"<br><small>{escape(r.detail)}</small>" if r.detail else ""
    return (
        f'<figure class="wrong">{pic}<figcaption><b title="{escape(r.path)}">{escape(Path(r.path).name)}'
        f"</b><br>given: {escape(r.given or '(none)')}{fix}<br>{escape(r.kind)}, score {r.score:.3f}"
        f"{detail}</figcaption></figure>"
    )


def write_audit_html(path: Path, issues: Sequence[Issue], summary: dict[str, Any]) -> Path:
    """A self-contained page (the run report's style and Content-Security-Policy: inline CSS,
    base64 thumbnails, nothing fetched) with the first :data:`HTML_LIMIT` issues in order."""
    from ..insight.html import CSP, CSS, escape, section, table

    n = summary.get("images", 0)
    rows = [[escape(k), escape(v)] for k, v in (
        ("images", n), ("out-of-fold accuracy", f"{summary.get('oof_accuracy', 0):.3f}"),
        ("label issues (confident learning)", summary.get("label_issues", 0)),
        ("near-duplicates with different labels", len(summary.get("near_duplicate_conflicts", []))),
        ("outliers", summary.get("outliers", 0)),
        ("model", summary.get("model", "")), ("folds", summary.get("folds", "")),
    )]  # fmt: skip
    conf = [[escape(c["given"]), escape(c["suggested"]), str(c["images"])]
            for c in summary.get("top_confusions", [])]  # fmt: skip
    intro = (
        "<p>Each image's class probabilities come from a model that did not see its label "
        "(out-of-fold). <b>label</b>: confident learning (cleanlab) says the given label is "
        "unlikely; <b>near-duplicate</b>: the same picture carries another label; "
        "<b>outlier</b>: far from every other image. Score: 1 - the out-of-fold probability "
        "of the given label. Check these first; fix or drop the wrong ones.</p>"
    )
    body = table(["", ""], rows) + (
        "<h3>Most frequent suspected confusions</h3>"
        + table(["given", "suggested", "images"], conf, "num")
        if conf
        else ""
    )
    shown = list(issues)[:HTML_LIMIT]
    more = (f"<p>{len(issues) - len(shown)} more in label_issues.csv.</p>"
            if len(issues) > len(shown) else "")  # fmt: skip
    gallery = f'<div class="gallery">{"".join(_issue_card(r) for r in shown)}</div>{more}'
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>resfit audit: {len(issues)} image(s) to check</title><style>{CSS}</style></head>
<body><main><header><h1>Which labels look wrong</h1><p>{len(issues)} of {n} images to check,
most likely wrong first</p></header>
{section("summary", "Summary", intro + body)}
{section("issues", "Images to check", gallery or "<p>No issues found.</p>")}
</main></body></html>
"""
    atomic_write_text(path, doc, errors="backslashreplace")
    return path

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
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..core.atomic import atomic_write_text
from ..runs import REPORT
from .html import (
    CSP,
    CSS,
    escape,
)
from .report_data import IMBALANCE_RATIO, TOP_WRONG, ReportData, compute_metrics
from .report_sections import (
    accuracy_section,
    calibration_section,
    config_section,
    confusion_section,
    curves_section,
    data_section,
    errors_section,
    per_class_section,
    summary_section,
)
from .report_trust import trust_section

__all__ = ["IMBALANCE_RATIO", "SECTION_IDS", "TOP_WRONG", "ReportData", "write_report"]

SECTION_IDS = (
    "summary",
    "curves",
    "per-class",
    "confusion",
    "accuracy",
    "errors",
    "calibration",
    "trust",
    "data",
    "config",
)


def write_report(path: str | os.PathLike, data: ReportData) -> Path:
    """Write the report; returns the file written.

    ``path``: a ``.html`` file, or a folder (created) that gets ``report.html``.
    """
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)

    m = compute_metrics(data)
    sections = [
        summary_section(data, m),
        curves_section(list(data.history)),
        per_class_section(data, m),
        confusion_section(data, m),
        accuracy_section(data, m),
        errors_section(data, m),
        calibration_section(data, m),
        trust_section(data.unknown, m.probs, m.y_true, data.class_names),
        data_section(data),
        config_section(data.config),
    ]
    titles = {
        "summary": "Summary", "curves": "Curves", "per-class": "Per class",
        "confusion": "Confusion", "accuracy": "Accuracy", "errors": "Mistakes",
        "calibration": "Calibration", "trust": "When not to answer", "data": "Data", "config": "Config",
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
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(data.title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header><h1>{escape(data.title)}</h1><p>{len(m.y_true)} {escape(data.split)} images, {len(data.class_names)} classes</p></header>
<nav>{nav}</nav>
{chr(10).join(sections)}
<footer>resfit {escape(ver)} &middot; {escape(now)}</footer>
</main>
</body>
</html>
"""
    # Every user string went through escape; the error handler is the last guard for the report.
    atomic_write_text(out, doc, errors="backslashreplace")  # never half a report
    return out


def add_deploy_section(path: str | os.PathLike, deploy: Mapping) -> Path:
    """Put ``resfit bench deploy``'s table into an existing report as its "Deploy" section
    (replacing the one a previous run of the bench left), before the configuration, with a
    link in the page's navigation."""
    from .report_sections import deploy_section

    out = Path(path)
    page = out.read_text(encoding="utf-8")
    page = re.sub(r'<section id="deploy">.*?</section>\n?', "", page, flags=re.S)
    new = deploy_section(deploy) + "\n"
    at = page.find('<section id="config">')
    page = page[:at] + new + page[at:] if at >= 0 else page.replace("</body>", new + "</body>")
    if 'href="#deploy"' not in page:
        page = page.replace(
            '<a href="#config">', '<a href="#deploy">Deploy</a><a href="#config">', 1
        )
    atomic_write_text(out, page)
    return out

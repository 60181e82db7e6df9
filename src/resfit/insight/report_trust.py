"""The report's "When not to answer" section: the unknown score on validation, the
risk-coverage curve, and conformal coverage per class (docs/guide/trust-unknown.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..inference.conformal import conformal_threshold, prediction_sets
from .html import escape, img, png_uri, section, table

COVERAGE = 0.9  # the conformal table's target


def risk_coverage(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fraction answered and the error among the answered, answering the most confident
    first (the curve a confidence threshold moves along)."""
    order = np.argsort(-probs.max(1), kind="stable")
    wrong = (probs.argmax(1) != y)[order]
    n = np.arange(1, len(y) + 1)
    return n / len(y), np.cumsum(wrong) / n


def cross_conformal(
    probs: np.ndarray, y: np.ndarray, coverage: float = COVERAGE
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether its set (calibrated on the other half of the images) holds its
    label, and the set's size. Two folds, a fixed shuffle: no image calibrates itself."""
    idx = np.random.default_rng(0).permutation(len(y))
    halves = (idx[: len(y) // 2], idx[len(y) // 2 :])
    hit, size = np.zeros(len(y), bool), np.zeros(len(y), int)
    for cal, test in (halves, halves[::-1]):
        sets = prediction_sets(probs[test], conformal_threshold(probs[cal], y[cal], coverage))
        hit[test] = [label in s for label, s in zip(y[test], sets, strict=True)]
        size[test] = [len(s) for s in sets]
    return hit, size


def trust_section(
    unknown: Mapping | None, probs: np.ndarray, y: np.ndarray, classes: Sequence[str]
) -> str:
    """The section's HTML. ``unknown``: ``RUN/unknown.json``'s record with ``val_scores``
    (None: the run has no unknown score, and the section says so)."""
    fig = Figure(figsize=(10, 4))
    ax_h, ax_r = fig.subplots(1, 2)
    parts = []
    if unknown is not None:
        s, t = np.asarray(unknown["val_scores"]), float(unknown["threshold"])
        ax_h.hist(s, bins=40, color="tab:blue", alpha=0.8, label="validation")
        ax_h.axvline(t, color="tab:red", label=f"threshold {t:.3g}")
        ax_h.set(title=f"unknown score ({unknown['score']})", xlabel="higher = less like training")
        ax_h.legend()
        parts.append(f"<p>Unknown-input score <b>{escape(unknown['score'])}</b>: images over "
                     f"{t:.4g} are answered <code>unknown</code> (the threshold {escape(unknown['how'])}). "
                     "AUROC and FPR at 95 % TPR need images known to be out of scope: "
                     "<code>bench/unknown.py</code> measures them for each score.</p>")  # fmt: skip
    else:
        ax_h.set_axis_off()
        parts.append(
            "<p>This run has no unknown-input score (<code>--unknown-score none</code>).</p>"
        )
    cov, risk = risk_coverage(probs, y)
    ax_r.plot(cov, risk)
    ax_r.set(title="risk-coverage (most confident answered first)", xlabel="fraction answered",
             ylabel="error among answered")  # fmt: skip
    hit, size = cross_conformal(probs, y)
    rows = [[escape(c), str(int((y == i).sum())), f"{hit[y == i].mean():.3f}",
             f"{size[y == i].mean():.2f}"] for i, c in enumerate(classes) if (y == i).any()]  # fmt: skip
    rows.append(["all", str(len(y)), f"{hit.mean():.3f}", f"{size.mean():.2f}"])
    parts.append(f"<p>Conformal sets at {COVERAGE:.0%} (<code>--conformal {COVERAGE}</code>, APS), "
                 "each half of these images calibrating the other: coverage and mean set size "
                 "per class (the guarantee is over all classes together).</p>")  # fmt: skip
    body = "".join(parts) + img(png_uri(fig), "unknown score and risk-coverage", "fig")
    body += table(["class", "images", "coverage", "mean set size"], rows, "num")
    return section("trust", "When not to answer", body)

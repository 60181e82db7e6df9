"""What a study leaves in DIR: ``trials.csv``, ``best/`` and ``report.html``.

The report is one self-contained HTML file like a run's (inline PNG figures drawn with
matplotlib, no scripts): the optimisation history, the parameter importances (Optuna's default
PED-ANOVA evaluator) and the best parameters beside the defaults, which the study measured as its first
trial. Optuna's own plots need plotly and a browser that runs scripts; these need neither.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.atomic import atomic_dir
from ...runs import CHECKPOINTS, RunPaths

log = logging.getLogger("resfit")


@dataclass
class TuneResult:
    """What :func:`~resfit.apps.tune.tune` found: the best trial (copied to ``best_dir``) against
    the defaults, which the study ran as its first trial."""

    out: Path
    best_value: float | None
    best_params: dict[str, Any]
    best_dir: Path | None
    defaults_value: float | None
    counts: dict[str, int]  # counted trials by state: COMPLETE, PRUNED, FAIL
    wall_s: float
    failed_workers: list[int] = field(default_factory=list)  # exit codes of crashed workers


def counted(trials: list[Any]) -> int:
    """Trials that count towards the total: finished (COMPLETE, PRUNED, FAIL) or running, but
    not those closed as ``interrupted`` or ``surplus``."""
    states = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
    return sum(1 for t in trials if t.state.name in states and "excluded" not in t.user_attrs)


CSV_FIELDS = ("number", "state", "value", "params", "duration_s", "epochs", "reason", "note")


def _shown_value(t: Any) -> float | None:
    """A trial's score: its best validation score if complete, its last epoch's if pruned."""
    if t.state.name == "COMPLETE":
        return t.value
    if t.state.name == "PRUNED" and t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _note(t: Any) -> str:
    a = t.user_attrs
    if a.get("baseline"):
        return "defaults"
    if "retry_of" in a:
        return f"retry of {a['retry_of']}"
    return ""


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial, in order: number, state, value, params (JSON), duration, epochs
    reported, the reason it failed or was pruned, and a note (defaults, retry)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        v = _shown_value(t)
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name,
            "value": "" if v is None else f"{v:.6f}",
            "params": json.dumps(t.params, sort_keys=True),
            "duration_s": a.get("duration_s", ""), "epochs": len(t.intermediate_values),
            "reason": a.get("excluded") or a.get("reason", ""), "note": _note(t),
        })  # fmt: skip
    return rows


def write_trials_csv(study: Any, path: Path) -> None:
    from ...core.atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(trial_rows(study))
    atomic_write_text(path, buf.getvalue())


def _best(study: Any) -> Any | None:
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return max(done, key=lambda t: (t.value, -t.number), default=None)


def _baseline(study: Any) -> Any | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)


def save_best(trial: Any, out: Path) -> Path | None:
    """Copy the best trial's run folder to ``out/best`` (without its cache), whole or not
    at all; ``best/trial.json`` says which trial it is. None if the trial ran elsewhere (a
    study shared across machines): the log says where."""
    src = Path(trial.user_attrs.get("run_dir") or out / "trials" / f"{trial.number:04d}")
    if not RunPaths(src).model.exists():
        log.warning("resfit tune: the best trial (%d) ran on %s in %s, not here: copy it from "
                    "there", trial.number, trial.user_attrs.get("host", "?"), src)  # fmt: skip
        return None
    dest = out / "best"
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("cache", CHECKPOINTS),
                        dirs_exist_ok=True)  # fmt: skip
        info = {"trial": trial.number, "value": trial.value, "params": trial.params}
        (tmp / "trial.json").write_text(json.dumps(info, indent=2))
    return dest


def finish(study: Any, out: Path, wall_s: float) -> TuneResult:
    """trials.csv, best/ and report.html from the study as it stands; the result."""
    write_trials_csv(study, out / "trials.csv")
    trials = study.get_trials(deepcopy=False)
    kept = [t for t in trials if counted([t])]
    counts = {s: sum(t.state.name == s for t in kept) for s in ("COMPLETE", "PRUNED", "FAIL")}
    best, base = _best(study), _baseline(study)
    best_dir = save_best(best, out) if best is not None else None
    if best_dir is None:
        shutil.rmtree(out / "best", ignore_errors=True)  # never a best/ of an older best
    if best is None:
        log.warning("resfit tune: no trial completed; see %s", out / "trials.csv")
    result = TuneResult(
        out, best.value if best else None, dict(best.params) if best else {}, best_dir,
        _shown_value(base) if base else None, counts, wall_s,
    )  # fmt: skip
    write_report(study, out / "report.html", result, base)
    return result


# -- report.html ----------------------------------------------------------------------------------


def _history_figure(study: Any, base_value: float | None) -> str:
    from matplotlib.figure import Figure

    from ...insight.html import img, png_uri

    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    best, xs, ys = -math.inf, [], []
    for t in study.get_trials(deepcopy=False):
        v = _shown_value(t)
        if v is None:
            continue
        pruned = t.state.name == "PRUNED"
        ax.plot([t.number], [v], "x" if pruned else "o", color="#999" if pruned else "#2459a8",
                ms=6)  # fmt: skip
        if not pruned:
            best = max(best, v)
            xs.append(t.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#c0262d", label="best so far")
    if base_value is not None:
        ax.axhline(base_value, ls="--", color="#5b6472", label="defaults")
    ax.set_xlabel("trial")
    ax.set_ylabel("best val accuracy (pruned: last epoch, x)")
    ax.grid(alpha=0.3)
    if xs or base_value is not None:
        ax.legend(loc="lower right")
    return img(png_uri(fig), "optimisation history", "fig")


def _importance_figure(study: Any) -> str:
    """Optuna's PED-ANOVA importances of the parameters (how much each one's value separates
    the best trials from the rest), or why there are none yet."""
    from matplotlib.figure import Figure

    from ...insight.html import escape, img, png_uri

    try:
        import optuna

        with warnings.catch_warnings():  # "few trials in a regime": the figure says so
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
    except Exception as e:  # too few complete trials, or a parameter that never varied
        return f"<p>No importances yet: {escape(e)}</p>"
    if not imp:
        return "<p>No importances yet: no parameter varied across complete trials.</p>"
    names = list(imp)[::-1]
    fig = Figure(figsize=(7, 0.4 * len(names) + 1))
    ax = fig.subplots()
    ax.barh(names, [imp[n] for n in names], color="#2459a8")
    ax.set_xlabel("importance (PED-ANOVA, normalised; few trials: a rough guide)")
    return img(png_uri(fig), "parameter importances", "fig")


def _params_table(best: dict, base: Any | None) -> str:
    from ...insight.html import escape, table

    base_params = dict(base.params) if base is not None else {}
    names = sorted(set(best) | set(base_params))

    def shown(v: Any) -> str:
        return "" if v is None else escape(f"{v:.4g}" if isinstance(v, float) else v)

    rows = [[escape(n), shown(base_params.get(n)), shown(best.get(n))] for n in names]
    return table(["parameter", "defaults", "best"], rows)


def write_report(study: Any, path: Path, result: TuneResult, base: Any | None) -> None:
    """DIR/report.html: summary, history, importances, best beside defaults, every trial."""
    from ...core.atomic import atomic_write_text
    from ...insight.html import CSP, CSS, escape, section, table

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    c = result.counts
    summary = (
        f"<p class='big'>{pct(result.best_value)} <span class='ci'>best trial, against "
        f"{pct(result.defaults_value)} for the defaults</span></p>"
        f"<p>{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed; "
        f"{result.wall_s:.0f} s of wall time in this run. The best trial's run folder is "
        f"<code>best/</code>: <code>resfit eval</code>, <code>predict</code> and "
        f"<code>export</code> take it.</p>"
    )
    rows = trial_rows(study)
    rows_html = table(list(CSV_FIELDS), [[escape(r[k]) for k in CSV_FIELDS] for r in rows])
    sections = [
        section("summary", "Summary", summary),
        section("history", "Optimisation history", _history_figure(study, result.defaults_value)),
        section("importance", "Parameter importances", _importance_figure(study)),
        section("best", "Best parameters beside the defaults", _params_table(result.best_params, base)),
        section("trials", "Trials", rows_html),
    ]  # fmt: skip
    doc = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>resfit tune: {escape(path.parent.name)}</title><style>{CSS}</style></head>"
        f"<body><main><header><h1>resfit tune: {escape(path.parent.name)}</h1></header>"
        f"{''.join(sections)}</main></body></html>"
    )
    atomic_write_text(path, doc)

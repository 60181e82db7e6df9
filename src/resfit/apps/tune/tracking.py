"""``resfit tune --track mlflow``: the study is one MLflow run, each trial a child run of it.

The parent run is started once per study folder and recorded in ``DIR/tracking.json``, so a
study run again to finish its trials keeps adding children to the same parent. The trials
are ordinary tracked training runs (:mod:`resfit.training.tracking`) started inside
:func:`~resfit.training.tracking.parent_run`; when the study ends, the parent gets the best
value, ``trials.csv`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ... import runs
from ...training import tracking

__all__ = ["end_study_run", "study_run", "study_tracked"]

log = logging.getLogger("resfit")


def study_run(out: Path, fixed: dict[str, Any], trials: int) -> str | None:
    """The MLflow run id of the study in ``out`` (started on its first run), or None when
    the study is not tracked."""
    if fixed.get("track") != "mlflow":
        return None
    record = runs.read_tracking(out)
    if record and record.get("tracker") == "mlflow":  # a study run again: running again
        tracking.client().update_run(record["run_id"], status="RUNNING")
        return record["run_id"]
    params = tracking.flat_params({"tune": {"trials": trials, **fixed}})
    run_id = tracking.start_run(out.resolve().name, params, {"resfit.study_dir": str(out)})
    runs.write_tracking(out, {"tracker": "mlflow", "run_id": run_id,
                              "tracking_uri": tracking.client().tracking_uri})  # fmt: skip
    return run_id


def end_study_run(run_id: str | None, out: Path, best_value: float | None) -> None:
    """The study's result on its parent run: the best value, trials.csv and report.html."""
    if run_id is None:
        return
    c = tracking.client()
    if best_value is not None:
        c.log_metric(run_id, "best_value", best_value)
    for name in ("trials.csv", "report.html"):
        if (out / name).is_file():
            c.log_artifact(run_id, str(out / name))
    c.set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def study_tracked(run_id: str | None) -> Iterator[None]:
    """Ends the study's parent run when the block is left by an exception: KILLED for
    Ctrl-C, FAILED for an error (the block's own end calls :func:`end_study_run`). Without it
    an interrupted study's parent stayed RUNNING in MLflow for ever."""
    if run_id is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        try:
            tracking.client().set_terminated(run_id, status)
        except Exception as err:  # the store gone too: the study's own error matters more
            log.warning("resfit tune: could not mark MLflow run %s %s: %s", run_id, status, err)
        raise

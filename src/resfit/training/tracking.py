"""Experiment tracking: ``--track mlflow`` logs a run to MLflow as it trains.

Where: MLflow's own conventions, so a run lands where ``mlflow ui`` (started in the same
folder) or the team's server looks: ``MLFLOW_TRACKING_URI`` (a ``sqlite:///`` file, a
``file:`` folder or an ``http(s)://`` server), else MLflow's default, ``sqlite:///mlflow.db`` in
the current folder (MLflow 3; artifacts in ``./mlruns``). ``MLFLOW_EXPERIMENT_NAME`` picks the
experiment (default ``resfit``).

What: the resolved config as parameters (``section.option``, after ``auto`` values are
settled), every epoch's row of ``metrics.csv`` as metrics at step = epoch, and, once the run
is finished, its files (model, config, calibration, metrics, log, report) and ``export/`` as
artifacts. ``RUN/tracking.json`` records the MLflow run, so ``--resume`` continues the same
MLflow run and ``resfit export`` adds its exports to it. A ``resfit tune`` study is a parent
run and each trial a child run (:func:`parent_run`).

MLflow is imported only when ``--track`` is set. A tracking store that stops answering mid-run
costs a warning, not the training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import runs
from ..core.config import TrainConfig
from ..core.errors import ConfigError, MissingExtraError
from .loop import Callback, Loop

__all__ = [
    "MlflowTracking",
    "check_tracker",
    "flat_params",
    "log_exports",
    "parent_run",
    "start_run",
    "tracked",
]

log = logging.getLogger("resfit")
EXPERIMENT = "resfit"
_PARENT: list[str | None] = [None]  # the tune study's run, for its trials (one per process)
_PARAM_LIMIT = 6000  # MLflow's longest parameter value


def check_tracker(name: str) -> None:
    """Answer a missing extra (one line with the pip command) before any data is read."""
    if name == "mlflow":
        _mlflow()


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise MissingExtraError("mlflow", "mlflow") from None
    return mlflow


def client() -> Any:
    """An MlflowClient of the tracking URI the environment names (MLflow's default else)."""
    return _mlflow().MlflowClient()


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: ``{"optim.lr": "0.1", ...}`` (JSON for lists)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_LIMIT]
    return out


@contextmanager
def parent_run(run_id: str | None) -> Iterator[None]:
    """Runs started inside are children of ``run_id`` (a tune study's trials)."""
    before, _PARENT[0] = _PARENT[0], run_id
    try:
        yield
    finally:
        _PARENT[0] = before


def start_run(name: str, params: Mapping[str, str], tags: Mapping[str, str] = ()) -> str:
    """A new MLflow run in the experiment (created when missing), with ``params``; its id.
    A store that cannot be reached is a :class:`ConfigError` naming ``MLFLOW_TRACKING_URI``."""
    from mlflow.entities import Param

    c = client()
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    try:
        found = c.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else c.create_experiment(experiment)
        tags = {"mlflow.runName": name, **dict(tags)}
        if _PARENT[0]:
            tags["mlflow.parentRunId"] = _PARENT[0]
        run_id = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
    except Exception as e:  # MLflow raises many kinds for a bad URI or a server that is down
        uri = _mlflow().get_tracking_uri()
        raise ConfigError(f"--track mlflow: the tracking store {uri} did not answer ({e}); "
                          f"set MLFLOW_TRACKING_URI to one that does") from None  # fmt: skip
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
        c.log_batch(run_id, params=items[i : i + 100])
    return run_id


class MlflowTracking(Callback):
    """Logs the run to MLflow: parameters before the first epoch, each epoch's metrics, and
    (through :func:`tracked`) the finished run folder as artifacts."""

    order = 97  # after Checkpoint (95), which restores the run id of a resumed run

    def __init__(self, cfg: TrainConfig, out: Path) -> None:
        _mlflow()  # a missing extra answers before the data is read
        self.cfg, self.out = cfg, Path(out)
        self.run_id: str | None = None
        self.warned = False
        self.client: Any = None  # one client for the run (its store's connection is reused)

    def before_fit(self, loop: Loop) -> None:
        self.client = client()
        if self.run_id is None:
            self.run_id = start_run(self.out.name, flat_params(self.cfg.to_dict()),
                                    {"resfit.run_dir": str(self.out.resolve())})  # fmt: skip
        else:  # --resume: the same MLflow run goes on
            self.client.update_run(self.run_id, status="RUNNING")
        uri = _mlflow().get_tracking_uri()
        runs.write_tracking(self.out, {"tracker": "mlflow", "tracking_uri": uri,
                                       "run_id": self.run_id})  # fmt: skip
        log.info("tracking: MLflow run %s at %s", self.run_id, uri)

    def after_epoch(self, loop: Loop) -> None:
        from mlflow.entities import Metric

        row, now = loop.row, int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in row.items()
                   if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
        self._try(lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def _try(self, call: Any) -> None:
        try:
            call()
        except Exception as e:  # the store is down: the training goes on
            if not self.warned:
                log.warning("tracking: MLflow did not take the log (%s); training goes on", e)
            self.warned = True

    def end(self, status: str = "FINISHED") -> None:
        """Log the run folder's files and exports, then mark the MLflow run ended with
        ``status`` (FINISHED, FAILED or KILLED)."""
        if self.run_id is None or self.client is None:
            return
        c = self.client
        for path in runs.artifact_paths(self.out):
            if path.is_dir():
                self._try(lambda p=path: c.log_artifacts(self.run_id, str(p), p.name))
            else:
                self._try(lambda p=path: c.log_artifact(self.run_id, str(p)))
        self._try(lambda: c.set_terminated(self.run_id, status))

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


@contextmanager
def tracked(loop: Loop) -> Iterator[None]:
    """Ends the loop's MLflow run (if it has one) when the block ends: its artifacts are the
    run folder as the block leaves it (training, calibration, report), FAILED on an error."""
    tracker = loop.callback(MlflowTracking)
    if tracker is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        # Ctrl-C, or a tuner's pruning (optuna.TrialPruned; training/ does not import optuna):
        # stopped on purpose, not a failure.
        stopped = isinstance(e, KeyboardInterrupt) or type(e).__name__ == "TrialPruned"
        tracker.end("KILLED" if stopped else "FAILED")
        raise
    tracker.end("FINISHED")


def log_exports(run: str | os.PathLike, folder: str | os.PathLike | None = None) -> bool:
    """Add an export folder (default ``RUN/export/``) to the MLflow run of a tracked run,
    under ``export/`` (``resfit export`` calls it); False, and MLflow not imported, for a run
    that was not tracked."""
    record = runs.read_tracking(run)
    folder = Path(folder or runs.RunPaths(run).export)
    if not record or record.get("tracker") != "mlflow" or not folder.is_dir():
        return False
    c = _mlflow().MlflowClient(record["tracking_uri"])
    c.log_artifacts(record["run_id"], str(folder), "export")
    return True

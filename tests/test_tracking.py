"""--track mlflow: a run and a tune study in a local SQLite store, read back through MLflow's
own client (parameters, per-epoch metrics equal to metrics.csv, artifacts, child runs)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")  # SQLAlchemy 2 notes

from .images import make_colour_folder  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = dict(arch="resnet20_cifar", img_size=16, batch_size=16, progress=False, leakage="off",
            track="mlflow")  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store (its tables take seconds to create) and artifact folder per module."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture()
def tracked_env(store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(store)  # the default artifact root, ./mlruns, lands in the store's folder
    return uri


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=8)


def test_a_tracked_run_reads_back_through_mlflows_client(
    colours: Path, tmp_path: Path, tracked_env: str
) -> None:
    import resfit

    out = tmp_path / "run"
    resfit.train(data=str(colours), out=str(out), epochs=2, lr=0.05, **TINY)
    record = json.loads((out / "tracking.json").read_text())
    assert record["tracking_uri"] == tracked_env

    client = mlflow.MlflowClient(tracked_env)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = json.loads((out / "config.json").read_text())
    params = run.data.params
    assert params["lr"] == "0.05" and params["epochs"] == "2" and params["track"] == "mlflow"
    assert params["arch"] == "resnet20_cifar" and params["classes"] == '["blue", "green", "red"]'
    assert params["weight_decay"] == str(config["weight_decay"])  # resolved: not "auto"
    assert params["augment.mixup"] == str(config["augment"]["mixup"])

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for name in set(rows[0]) - {"epoch"}:
        history = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == [
            (int(r["epoch"]), float(r[name])) for r in rows
        ]
    assert set(run.data.metrics) == set(rows[0]) - {"epoch"}

    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "report.html", "config.json", "metrics.csv"} <= arts
    local = Path(client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path)))
    assert local.read_bytes() == (out / "model.safetensors").read_bytes()

    # --resume: the same MLflow run goes on with the new epoch.
    resfit.train(out=str(out), resume=True, epochs=3)
    assert json.loads((out / "tracking.json").read_text())["run_id"] == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == [1, 2, 3] and client.get_run(run.info.run_id).info.status == "FINISHED"

    # resfit export's hook: the run's exports join its MLflow run, under export/.
    from resfit.training.tracking import log_exports

    (out / "export").mkdir()
    (out / "export" / "export.json").write_text("{}")
    assert log_exports(out)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == [
        "export/export.json"
    ]
    assert not log_exports(tmp_path)  # an untracked folder: nothing, MLflow not asked


def test_a_tune_study_is_a_parent_run_with_one_child_per_trial(
    colours: Path, tmp_path: Path, tracked_env: str
) -> None:
    pytest.importorskip("optuna")
    from resfit.apps.tune import tune

    out = tmp_path / "study"
    r = tune(colours, 3, out, epochs=1, report=False, **TINY)
    parent_id = json.loads((out / "tracking.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracked_env)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["tune.trials"] == "3"
    assert parent.data.metrics["best_value"] == pytest.approx(r.best_value)
    assert "trials.csv" in {a.path for a in client.list_artifacts(parent_id)}
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["0000", "0001", "0002"]
    for child in children:  # each trial: its own parameters and metrics
        trial = out / "trials" / child.info.run_name
        assert child.data.params["lr"] == str(json.loads((trial / "config.json").read_text())["lr"])
        assert "val_loss" in child.data.metrics


def test_without_mlflow_one_line_says_what_to_install(colours: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # as if the extra were not installed
        "from resfit.cli import main\n"
        f"sys.exit(main(['train', {str(colours)!r}, '--out', {str(tmp_path / 'r')!r}, "
        "'--epochs', '1', '--arch', 'resnet20_cifar', '--track', 'mlflow']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert res.returncode != 0
    assert "pip install 'resfit[mlflow]'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (OSError, "FAILED")])
def test_a_stopped_study_ends_its_parent_run(
    colours: Path, tmp_path: Path, tracked_env: str, monkeypatch, error, status
) -> None:
    pytest.importorskip("optuna")
    from resfit.apps.tune import study, tune

    def stopped(plan) -> None:
        raise error("stopped in the first trial")

    monkeypatch.setattr(study, "work", stopped)
    out = tmp_path / "study"
    with pytest.raises(error, match="stopped in the first trial"):
        tune(colours, 2, out, epochs=1, report=False, **TINY)
    parent_id = json.loads((out / "tracking.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracked_env)
    assert client.get_run(parent_id).info.status == status
    assert client.get_run(parent_id).info.end_time is not None
    # Run again to finish it: the same parent, running again.
    from resfit.apps.tune.tracking import study_run

    assert study_run(out, {"track": "mlflow"}, 2) == parent_id
    assert client.get_run(parent_id).info.status == "RUNNING"

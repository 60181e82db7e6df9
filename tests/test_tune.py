"""resfit tune: the study's total across restarts and processes, pruning, failures recorded,
one feature cache per head-only study, and best/ as a run folder that `resfit eval` takes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from resfit.apps.tune import search_space, tune  # noqa: E402
from resfit.apps.tune.study import HOST, JOURNAL, STUDY_NAME, open_storage  # noqa: E402
from resfit.core.config import TrainConfig  # noqa: E402
from resfit.core.errors import ConfigError, MissingExtraError  # noqa: E402
from resfit.models.weights import create_model  # noqa: E402

from .images import make_colour_folder  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=16, epochs=3, progress=False)
# A trial that learns the colours at once: the pruner's yardstick.
GOOD = {"lr": 0.05, "augment": "none", "mix": "off", "ema": False}


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=16)


def _study(out: Path, storage: str | None = None):
    return optuna.load_study(study_name=STUDY_NAME, storage=open_storage(out, storage))


def _rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cli(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen([sys.executable, "-m", "resfit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Fixed parameter:UserWarning")
def test_failures_are_recorded_pruning_stops_a_hopeless_trial_and_best_evaluates(
    colours: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    hopeless = {**GOOD, "lr": 1e-7}  # nothing moves: chance accuracy every epoch
    bad = {"label_smoothing": -0.5}  # outside what training takes
    r = tune(colours, 5, out, enqueue=[GOOD, bad, hopeless], **{**FAST, "epochs": 4})
    rows = _rows(out)
    assert [int(x["number"]) for x in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["note"] == "defaults" and rows[0]["state"] == "COMPLETE"
    assert rows[1]["state"] == "COMPLETE"
    # The reason is recorded, and the study went on to trial 4.
    assert rows[2]["state"] == "FAIL" and "--label-smoothing" in rows[2]["reason"], rows[2]
    assert (out / "trials" / "0002" / "error.log").exists()
    assert rows[3]["state"] == "PRUNED" and int(rows[3]["epochs"]) < 4, rows[3]
    assert rows[4]["state"] in ("COMPLETE", "PRUNED")
    assert r.counts["FAIL"] == 1 and r.counts["PRUNED"] >= 1
    assert json.loads(rows[3]["params"])["lr"] == pytest.approx(1e-7)

    # best/ is a run folder: `resfit eval` scores it as the study did.
    assert r.best_dir == out / "best" and r.best_value == max(
        float(x["value"]) for x in rows if x["state"] == "COMPLETE"
    )
    assert json.loads((out / "best" / "trial.json").read_text())["value"] == r.best_value
    res = subprocess.run([sys.executable, "-m", "resfit", "eval", str(out / "best"),
                          str(colours / "val"), "--json"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] == pytest.approx(r.best_value, abs=1.01 / 48)
    html = (out / "report.html").read_text()
    assert "Optimisation history" in html and "Parameter importances" in html
    assert "data:image/png;base64," in html and "<script" not in html


def test_a_restarted_study_runs_only_the_missing_trials(colours: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    tune(colours, 2, out, **FAST)
    # A process killed mid-trial leaves its trial RUNNING: simulate one on this host.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout  # fmt: skip
    study = _study(out)
    stale = study.ask()
    stale.set_user_attr("host", HOST)
    stale.set_user_attr("pid", int(gone))
    lr = stale.suggest_float("lr", 0.01, 0.02, log=True)

    r = tune(colours, 4, out, **FAST)
    trials = _study(out).get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # no duplicates
    interrupted = trials[2]
    assert interrupted.state.name == "FAIL" and "interrupted" in interrupted.user_attrs["excluded"]
    counted = [t for t in trials if "excluded" not in t.user_attrs]
    assert len(counted) == 4 and sum(r.counts.values()) == 4
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 2)
    assert retry.params["lr"] == lr  # the interrupted trial's parameters ran again

    tune(colours, 4, out, **FAST)  # complete: nothing more runs
    assert len(_study(out).get_trials()) == len(trials)
    with pytest.raises(ConfigError, match="--epochs"):  # its trials would not compare
        tune(colours, 5, out, **{**FAST, "epochs": 5})


def test_processes_share_one_study_and_its_total(colours: Path, tmp_path: Path) -> None:
    out, shared = tmp_path / "study", tmp_path / "shared.journal"
    args = [str(colours), "--trials", "5", "--out", str(out), "--storage", str(shared),
            "--arch", "resnet20_cifar", "--img-size", "16", "--batch-size", "16",
            "--epochs", "2", "--no-progress"]  # fmt: skip
    procs = [_cli("tune", *args, "--jobs", "2"), _cli("tune", *args)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    trials = _study(out, str(shared)).get_trials()
    assert len(trials) == 5 and sorted(t.number for t in trials) == list(range(5))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert sorted(int(x["number"]) for x in _rows(out)) == list(range(5))
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:04d}" for i in range(5)]
    assert not (out / JOURNAL).exists()  # the study lives in --storage
    assert {t.user_attrs["pid"] for t in trials} - {p.pid for p in procs}  # --jobs: workers ran


def test_head_only_trials_share_one_feature_cache(colours: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "init.pth"
    torch.save(create_model("resnet20_cifar", num_classes=3).state_dict(), weights)
    out = tmp_path / "study"
    r = tune(colours, 3, out, weights=str(weights), freeze="backbone", augment="light", **FAST)
    assert sum(r.counts.values()) == 3
    stores = sorted(p.name.split("-")[0] for p in (out / "cache").glob("*.npy"))
    assert stores == ["train", "val"]  # one cache for the study, not one per trial
    logs = [(d / "train.log").read_text() for d in sorted((out / "trials").iterdir())]
    assert all("feature cache: --freeze backbone" in x for x in logs)
    computed = [x for x in logs if "feature cache: reusing" not in x]
    assert len(computed) == 1, "the backbone ran in more than one trial"


def test_search_space_leaves_given_options_fixed() -> None:
    cfg = TrainConfig.from_options(weights="w.pth", recipe="finetune", epochs=10)
    space = search_space(cfg, [])
    assert {"lr", "weight_decay", "label_smoothing", "augment", "crop_min", "mix",
            "head_epochs", "freeze", "ema"} == set(space)  # fmt: skip
    assert space["head_epochs"] == ("int", 0, 5)
    fixed = search_space(cfg, ["lr", "mixup", "head_epochs"])
    assert not {"lr", "mix", "head_epochs"} & set(fixed)
    head = TrainConfig.from_options(weights="w.pth", freeze="backbone")
    # A shared feature cache needs one augmentation, unmixed: not searched for head-only.
    assert not {"augment", "crop_min", "mix", "freeze"} & set(search_space(head, ["freeze"]))
    assert "freeze" not in search_space(TrainConfig(), [])  # from scratch nothing is frozen


def test_without_optuna_one_line_says_what_to_install(
    colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'resfit\[tune\]'"):
        tune(colours, 2, tmp_path / "study")


def test_tune_help_and_a_bad_option_answer_without_torch(tmp_path: Path) -> None:
    script = f"""
import sys
from resfit.cli import main
codes = []
try:
    main(["tune", "--help"])
except SystemExit as e:
    codes.append(e.code)
codes.append(main(["tune", "D", "--out", {str(tmp_path / "s")!r}, "--trials", "3", "--epochs", "0"]))
print(codes, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "optuna")))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[0, 2] []"
    assert "resfit tune: error: --epochs must be at least 1" in res.stderr
    assert "--trials" in res.stdout and "--storage" in res.stdout and "--jobs" in res.stdout
    assert not (tmp_path / "s").exists()


def test_an_rdb_url_holds_the_study_and_a_missing_driver_is_named(
    colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    r = tune(colours, 2, tmp_path / "study", storage=url, **{**FAST, "epochs": 1})
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=url).trials) == 2
    assert r.best_dir is not None and (r.best_dir / "model.safetensors").exists()

    def no_driver(url: str):
        raise ImportError("Failed to import DB access module for the specified storage URL.")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    with pytest.raises(ConfigError, match="pip install psycopg2-binary"):
        tune(colours, 2, tmp_path / "pg", storage="postgresql://u@db.example/tune", **FAST)


_CRASH_HOOK = """
import os
import time
if os.environ.get("RESFIT_TEST_CRASH_FROM"):  # trials from this number on kill their process
    import psutil
    import resfit.training as _training
    _real = _training.train
    def _siblings():
        me = psutil.Process()
        return [p for p in me.parent().children()
                if p.pid != me.pid and p.status() != psutil.STATUS_ZOMBIE]
    def _train(cfg=None, **kw):
        if int(os.path.basename(str(cfg.run.out))) >= int(os.environ["RESFIT_TEST_CRASH_FROM"]):
            # One order of events, whatever the load: the other worker ends first (it finds
            # the total reached, this trial RUNNING), then this one dies: no live worker is
            # left to claim the retry. A condition waited on, not a sleep.
            deadline = time.monotonic() + 300
            while _siblings() and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(9)  # as the kernel's OOM killer or a native crash would end it
        return _real(cfg, **kw)
    _training.train = _train
"""


def test_a_trial_that_kills_its_process_runs_once_more_then_fails(
    colours: Path, tmp_path: Path
) -> None:
    """Issue 26: such a trial was re-queued forever, and `resfit tune --jobs` exited 0. Its
    retry runs in the same `resfit tune` even when the other worker had already left."""
    pytest.importorskip("psutil")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASH_HOOK)  # in the workers too (PYTHONPATH)
    out = tmp_path / "study"
    args = ["tune", str(colours), "--trials", "2", "--out", str(out), "--jobs", "2", "--arch",
            "resnet20_cifar", "--img-size", "16", "--batch-size", "16", "--epochs", "2",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "RESFIT_TEST_CRASH_FROM": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(SRC), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    res = subprocess.run([sys.executable, "-m", "resfit", *args], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "crashed" in res.stderr
    trials = _study(out).get_trials()
    states = [(t.state.name, "excluded" in t.user_attrs) for t in trials]
    assert states == [("COMPLETE", False), ("FAIL", True), ("FAIL", False)], states
    assert "interrupted" in trials[1].user_attrs["excluded"]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert "died, 2 time(s)" in trials[2].user_attrs["reason"]
    # The study has its two trials: run again, nothing more runs, and the exit is clean.
    env.pop("RESFIT_TEST_CRASH_FROM")
    res = subprocess.run([sys.executable, "-m", "resfit", *args], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_study(out).get_trials()) == 3

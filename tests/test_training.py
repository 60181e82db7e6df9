"""The life cycle: train, checkpoint, resume, guards, evaluate and predict, through API and CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resfit.training as training
from resfit.inference.predictor import Predictor
from resfit.training import TrainConfig, TrainingError, train

from .images import make_colour_folder, write_broken_files

FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=16, progress=False, augment="light")


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resfit", *args], capture_output=True, text=True, timeout=timeout
    )


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(
        tmp_path_factory.mktemp("colours"), per_class=16, splits=("train", "val", "test")
    )


@pytest.fixture(scope="module")
def trained_run(colours: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    # --unknown-score none: the columns as before (the unknown ones: tests/test_unknown.py).
    res = _cli("train", str(colours), "--out", str(out), "--arch", "resnet20_cifar", "--img-size", "16",
               "--epochs", "6", "--batch-size", "16", "--lr", "0.1", "--augment", "light", "--no-progress",
               "--unknown-score", "none")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout
    return out


def test_run_folder_holds_everything_needed(trained_run: Path) -> None:
    for name in ["config.json", "classes.json", "model.safetensors", "metrics.csv", "train.log",
                 "skipped.csv", "summary.json", "checkpoints/last.pt", "checkpoints/best.safetensors",
                 "eval-test/confusion.png", "eval-test/per_class.csv"]:  # fmt: skip
        assert (trained_run / name).is_file(), name
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["classes"] == ["blue", "green", "red"] and cfg["img_size"] == 16
    assert cfg["lr"] == 0.1 and cfg["augment"]["preset"] == "light"
    rows = _metrics(trained_run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    ck = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 6


def test_eval_json_and_predict_csv(trained_run: Path, colours: Path, tmp_path: Path) -> None:
    res = _cli("eval", str(trained_run), str(colours), "--json")
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["n"] == 48 and metrics["accuracy"] >= 0.9
    assert (trained_run / "eval-" / "confusion.csv").exists() or any(
        trained_run.glob("eval-*/confusion.csv")
    )

    out = tmp_path / "pred.csv"
    res = _cli("predict", str(trained_run), str(colours / "test" / "red"), str(colours / "test" / "blue" / "00*.png"),
               "--top-k", "2", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "confidence", "label_2", "confidence_2"]
    assert len(rows) == 16 + 10
    red = [r for r in rows if "/red/" in r["path"]]
    assert sum(r["label"] == "red" for r in red) >= 14
    assert all(float(r["confidence"]) >= float(r["confidence_2"]) for r in rows)


def test_predictor_api_needs_only_the_run_folder(
    trained_run: Path, colours: Path, tmp_path: Path
) -> None:
    import shutil

    moved = tmp_path / "shipped"
    shutil.copytree(trained_run, moved, ignore=shutil.ignore_patterns("checkpoints", "eval-*"))
    p = Predictor.from_run(moved)
    preds, skipped = p.predict([colours / "test" / "green"], top_k=3)
    assert not skipped and len(preds) == 16
    assert sum(x.label == "green" for x in preds) >= 14
    assert all(abs(sum(c for _, c in x.top_k) - 1) < 1e-4 for x in preds)


def test_predict_streams_chunks_with_the_same_answers(
    trained_run: Path, colours: Path, tmp_path: Path
) -> None:
    """Batch 2 makes chunks of 8 images, decoded ahead of the model: same answers, same order,
    broken files still listed, as predicting everything in one batch."""
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(colours / "test", folder)
    (folder / "red" / "zz_broken.jpg").write_bytes(b"not an image")
    p = Predictor.from_run(trained_run)
    small, skipped_small = p.predict([folder], top_k=2, batch_size=2)
    whole, skipped_whole = p.predict([folder], top_k=2, batch_size=64)
    assert len(small) == len(whole) == 48
    assert [x.path for x in small] == [x.path for x in whole]
    assert [x.label for x in small] == [x.label for x in whole]
    assert all(abs(a.confidence - b.confidence) < 1e-5 for a, b in zip(small, whole, strict=True))
    assert len(skipped_small) == len(skipped_whole) == 1 and "zz_broken" in skipped_small[0][0]


def test_broken_and_odd_files_are_skipped_and_listed(colours: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(colours, data)
    broken = write_broken_files(data / "train" / "red")
    from PIL import Image

    Image.new("CMYK", (20, 20), (0, 200, 200, 0)).save(data / "train" / "red" / "cmyk.jpg")
    Image.new("I;16", (20, 20), 3000).save(data / "train" / "blue" / "deep.png")
    r = train(TrainConfig.from_options(data=str(data), out=str(tmp_path / "run"), epochs=1, **FAST))
    with open(tmp_path / "run" / "skipped.csv") as f:
        listed = {row["path"] for row in csv.DictReader(f)}
    assert listed == {str(p) for p in broken}
    assert r.history and len(r.history) == 1


def test_killed_run_resumes_and_finishes_with_the_same_epochs(
    colours: Path, tmp_path: Path
) -> None:
    args = ["train", str(colours), "--arch", "resnet20_cifar", "--img-size", "16", "--batch-size", "8",
            "--epochs", "5", "--augment", "light", "--no-progress", "--seed", "1"]  # fmt: skip
    reference = tmp_path / "reference"
    assert _cli(*args, "--out", str(reference)).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "resfit", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(_metrics(run))
    assert 1 <= done < 5, "the kill should land mid-run"
    res = _cli(*args, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr
    rows = _metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    # Per-epoch seeding makes the resumed run the same run as the uninterrupted one.
    ref = _metrics(reference)
    for a, b in zip(rows, ref, strict=True):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-3, abs=1e-4)


def test_resume_applies_the_options_that_may_change_and_refuses_the_others(
    colours: Path, tmp_path: Path
) -> None:
    """Issue 13, defect 8: --resume used to drop every flag given with it."""
    run = tmp_path / "run"
    args = ["train", str(colours), "--out", str(run), "--arch", "resnet20_cifar", "--img-size", "16",
            "--batch-size", "16", "--augment", "light", "--no-progress", "--no-report"]  # fmt: skip
    assert _cli(*args, "--epochs", "2").returncode == 0
    res = _cli(*args, "--resume", "--epochs", "4")  # the same command line, and a new --epochs
    assert res.returncode == 0, res.stderr
    assert [int(r["epoch"]) for r in _metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "config.json").read_text())["epochs"] == 4

    # DATA may be left out with --resume; the run's own holds.
    res = _cli("train", "--out", str(run), "--resume", "--epochs", "5", "--lr", "0.5")
    assert res.returncode == 2
    assert "--lr" in res.stderr and "Traceback" not in res.stderr
    assert len(_metrics(run)) == 4  # refused before anything ran


def test_existing_run_is_not_overwritten(trained_run: Path, colours: Path) -> None:
    with pytest.raises(TrainingError, match="already holds a run"):
        train(TrainConfig.from_options(data=str(colours), out=str(trained_run), **FAST))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    colours: Path, tmp_path: Path, monkeypatch
) -> None:
    import resfit.tasks.single as single

    real = single.soft_cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, *args):
        calls["n"] += 1
        loss = real(logits, target, *args)
        return loss * float("nan") if calls["n"] > 3 * 3 else loss  # 3 steps per epoch

    # SingleLabel.loss calls it through the module global.
    monkeypatch.setattr(single, "soft_cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 4.*last good checkpoint"):
        train(
            TrainConfig.from_options(data=str(colours), out=str(tmp_path / "run"), epochs=6, **FAST)
        )
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_failed_checkpoint_write_leaves_the_previous_one_intact(
    colours: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    real_save = torch.save
    state = {"n": 0}

    def flaky_save(obj, f, *a, **kw):
        state["n"] += 1
        if state["n"] == 2:  # the second epoch's checkpoint: the disk is full
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(training.torch, "save", flaky_save)
    run = tmp_path / "run"
    with caplog.at_level("ERROR", logger="resfit"):
        train(TrainConfig.from_options(data=str(colours), out=str(run), epochs=2, **FAST))
    assert "No space left" in caplog.text
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1  # epoch 2's failed write did not replace epoch 1's checkpoint
    assert not list((run / "checkpoints").glob(".*tmp"))


def test_early_stopping(colours: Path, tmp_path: Path) -> None:
    # With a zero learning rate nothing improves after the first epoch.
    r = train(TrainConfig.from_options(data=str(colours), out=str(tmp_path / "run"), epochs=10, lr=1e-12,
                          early_stopping=2, **FAST))  # fmt: skip
    assert len(r.history) == 3


def test_frozen_part_keeps_its_weights_and_bn_statistics(colours: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from resfit.models.weights import create_model

    init = create_model("resnet20_cifar", num_classes=3)
    torch.save(init.state_dict(), tmp_path / "init.pth")
    train(TrainConfig.from_options(data=str(colours), out=str(tmp_path / "run"), epochs=2, freeze="layer2",
                      weights=str(tmp_path / "init.pth"), **FAST))  # fmt: skip
    after = load_file(str(tmp_path / "run" / "model.safetensors"))
    before = init.state_dict()
    for k in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.bn1.running_var",
        "layer2.2.conv2.weight",
    ]:
        torch.testing.assert_close(after[k], before[k], msg=k)
    assert not torch.equal(after["layer3.2.conv2.weight"], before["layer3.2.conv2.weight"])
    assert not torch.equal(after["layer3.0.bn1.running_mean"], before["layer3.0.bn1.running_mean"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet5"], "unknown model 'resnet5'"),
        (["--weights", "nope.pth"], "nope.pth does not exist"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_options_give_one_clear_line(colours: Path, tmp_path: Path, args, message) -> None:
    res = _cli("train", str(colours), "--out", str(tmp_path / "r"), *args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_predict_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    res = _cli("predict", str(tmp_path), str(tmp_path))
    assert res.returncode == 2 and "config.json is missing" in res.stderr

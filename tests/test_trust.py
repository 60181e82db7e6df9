"""Issue 6 wiring: report, calibration, imbalance, leakage, explain and export from real runs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from resfit.inference.predictor import Predictor
from resfit.insight.report import SECTION_IDS
from resfit.training import TrainConfig, train

from .images import make_colour_folder

FAST = dict(
    arch="resnet20_cifar", img_size=16, batch_size=16, progress=False, augment="light", lr=0.1
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resfit", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    data = make_colour_folder(
        tmp_path_factory.mktemp("data"), per_class=16, splits=("train", "val", "test")
    )
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig.from_options(data=str(data), out=str(out), epochs=5, **FAST))
    return data, out


def test_training_writes_a_report_with_every_section(run) -> None:
    _, out = run
    html = (out / "report.html").read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in html, sid
    assert "http://" not in html and "https://" not in html  # opens offline


def test_temperature_is_fitted_on_val_and_applied_by_predict(run) -> None:
    data, out = run
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["fitted_on"] == "validation" and cal["temperature"] > 0
    p = Predictor.from_run(out)
    assert p.temperature == cal["temperature"]
    decoded = p.decode(sorted((data / "test" / "red").glob("*.png")))
    logits = p.logits(decoded)
    torch.testing.assert_close(
        p.probabilities(logits), torch.softmax(logits / cal["temperature"], 1)
    )
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9


def test_eval_writes_its_own_report(run) -> None:
    data, out = run
    res = _cli("eval", str(out), str(data / "test"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["balanced_accuracy"] >= 0.9
    assert 'id="calibration"' in (out / "eval-test" / "report.html").read_text()


def test_explain_writes_grad_cam_overlays(run, tmp_path: Path) -> None:
    data, out = run
    res = _cli("explain", str(out), str(data / "test" / "blue" / "000.png"), "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    from PIL import Image

    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (128, 128)
    assert _cli("explain", str(out), str(data), "--class", "purple").returncode == 2


def test_export_int8_and_onnx_predictions_agree_with_torch(run, tmp_path: Path) -> None:
    data, out = run
    res = _cli("export", str(out), "--int8", "--calib", str(data / "train"))
    assert res.returncode == 0, res.stderr
    assert "unused nodes" not in res.stderr  # the exporter's per-pass chatter stays out of the log
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["max_abs_logit_diff"] < 1e-3
    assert abs(info["int8_accuracy_change"]) <= 0.05 and info["top1_agreement"] >= 0.95
    labels = {}
    for engine, precision in [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")]:
        r = _cli(
            "predict", str(out), str(data / "test"), "--engine", engine, "--precision", precision
        )
        assert r.returncode == 0, r.stderr
        labels[engine + precision] = [row["label"] for row in csv.DictReader(r.stdout.splitlines())]
    assert labels["torchfp32"] == labels["onnxfp32"]
    agree = np.mean([a == b for a, b in zip(labels["torchfp32"], labels["onnxint8"], strict=True)])
    assert agree >= 0.95


def test_predict_int8_without_export_says_what_to_run(tmp_path: Path, run) -> None:
    _, out = run
    shutil.copytree(out, tmp_path / "r", ignore=shutil.ignore_patterns("export"))
    r = _cli("predict", str(tmp_path / "r"), str(out), "--engine", "onnx", "--precision", "int8")
    assert r.returncode == 2 and "resfit export" in r.stderr


def _uneven(root: Path) -> Path:
    data = make_colour_folder(root, per_class=4, splits=("train", "val"))
    rng = np.random.default_rng(5)
    from .images import colour_image

    for i in range(40):  # red has 44 train images, the others 4
        colour_image((200, 40, 40), rng).save(data / "train" / "red" / f"extra{i}.png")
    return data


def test_imbalance_warns_and_balance_options_change_training(tmp_path: Path, caplog) -> None:
    data = _uneven(tmp_path / "d")
    with caplog.at_level("WARNING", logger="resfit"):
        train(
            TrainConfig.from_options(data=str(data), out=str(tmp_path / "plain"), epochs=1, **FAST)
        )
    assert "classes are uneven" in caplog.text
    runs = {}
    for balance in ("weights", "sampler"):
        r = train(
            TrainConfig.from_options(
                data=str(data), out=str(tmp_path / balance), epochs=1, balance=balance, **FAST
            )
        )
        runs[balance] = r.history[0]["train_loss"]
        assert json.loads((tmp_path / balance / "config.json").read_text())["balance"] == balance
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert plain and runs["weights"] != runs["sampler"]


def test_leakage_is_reported_and_removed_from_val(tmp_path: Path, caplog) -> None:
    data = make_colour_folder(tmp_path / "d", per_class=8, splits=("train", "val"))
    shutil.copy(data / "train" / "red" / "003.png", data / "val" / "red" / "leak.png")
    with caplog.at_level("WARNING", logger="resfit"):
        r = train(
            TrainConfig.from_options(
                data=str(data), out=str(tmp_path / "r"), epochs=1, leakage="remove", **FAST
            )
        )
    assert "appear in more than one split" in caplog.text
    assert r.history
    assert "leak.png" in (tmp_path / "r" / "report.html").read_text()
    # 24 val images + the leaked copy = 25 found; the copy was dropped before training
    assert "24 train / 24 val images" in (tmp_path / "r" / "train.log").read_text()


def test_test_time_augmentation_averages_the_image_and_its_mirror(run) -> None:
    data, out = run
    plain, tta = Predictor.from_run(out), Predictor.from_run(out, tta=True)
    decoded = plain.decode(sorted((data / "test" / "green").glob("*.png"))[:4])
    mirrored = plain.decode([])
    mirrored.images = [img.flip(-1) for img in decoded.images]
    mirrored.labels, mirrored.paths = decoded.labels, decoded.paths
    expected = (plain.logits(decoded) + plain.logits(mirrored)) / 2
    got = tta.logits(decoded)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain.logits(decoded))  # the mirror changed something
    res = _cli("predict", str(out), str(data / "test" / "green"), "--tta")
    assert res.returncode == 0 and res.stdout.count("green") >= 14

"""The life cycle on the real data sets in ../shared (skipped with the reason when absent)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import CIFAR_ZIP, need


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resfit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    """1,000 training images (100 per class) and the first 200 test images of each class."""
    need(CIFAR_ZIP)
    root = tmp_path_factory.mktemp("cifar-subset")
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        keep = [n for n in names if int(Path(n).stem) < (100 if n.startswith("train/") else 200)]
        z.extractall(root, members=keep)
    return root


def test_resnet20_from_scratch_on_a_cifar_subset_learns(cifar_subset: Path, tmp_path: Path) -> None:
    """Short version of bench/train_cifar.py: 1,000 images, 6 epochs. Measured 0.30-0.36 test
    accuracy over seeds in fp32 (chance is 0.10); fp32 pinned, as `auto` moves with the CPU."""
    run = tmp_path / "run"
    res = _cli("train", str(cifar_subset), "--out", str(run), "--arch", "resnet20_cifar", "--epochs", "6",
               "--batch-size", "64", "--augment", "light", "--no-progress", "--no-report",
               "--precision", "fp32")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    test = json.loads((run / "summary.json").read_text())["test"]
    assert test["n"] == 2000
    assert test["accuracy"] > 0.22


def test_flowers_from_the_resnet56_checkpoint_end_to_end(
    flowers_root: Path, cifar_mirror: Path, tmp_path: Path
) -> None:
    """Transfer at 32 px with the head replaced: train, validate, test (on val) and predict."""
    run = tmp_path / "run"
    # --unknown-score none: every CSV label answered (the unknown flags: tests/test_unknown.py).
    res = _cli("train", str(flowers_root), "--out", str(run), "--arch", "resnet56_cifar",
               "--weights", "pretrained", "--epochs", "1", "--batch-size", "64", "--no-progress",
               "--no-report", "--leakage", "off", "--precision", "fp32",
               "--unknown-score", "none")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "new 5-class head" in res.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["img_size"] == 32 and cfg["classes"] == [
        "daisy",
        "dandelion",
        "roses",
        "sunflowers",
        "tulips",
    ]
    res = _cli("eval", str(run), str(flowers_root / "val"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout)
    assert metrics["n"] == 736 and metrics["accuracy"] > 0.4  # chance is 0.2
    out = tmp_path / "pred.csv"
    res = _cli(
        "predict", str(run), str(flowers_root / "val" / "roses"), "--top-k", "5", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert len(rows) > 100 and {r["label"] for r in rows} <= set(cfg["classes"])

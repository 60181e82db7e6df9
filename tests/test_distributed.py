"""Distributed training on PyTorch's own engine: torchrun, 2 processes, gloo on this CPU."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resfit.training import TrainConfig, train

from .images import make_colour_folder

ARGS = ["--arch", "resnet20_cifar", "--img-size", "16", "--batch-size", "16", "--epochs", "2",
        "--augment", "none", "--no-progress", "--seed", "3", "--lr", "0.05", "--no-report",
        "--leakage", "off", "--precision", "fp32"]  # fmt: skip
# fp32: the match is to float tolerance only there; under bf16 autocast (picked by `auto` on a
# CPU with native bf16) splitting the batch changes the bf16 rounding of each sample's path.


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_colour_folder(
        tmp_path_factory.mktemp("dist"), per_class=16, splits=("train", "val")
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "resfit", "train", str(data), "--out", str(out),
           "--device", "cpu", *ARGS, *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(
    data: Path, tmp_path: Path
) -> None:
    # A frozen backbone keeps BatchNorm in inference mode, so the only difference between one
    # process and two is how the global batch is split and the gradients averaged (gloo).
    extra = ["--freeze", "backbone", "--weights", str(tmp_path / "init.pth")]
    from resfit.models.weights import create_model

    torch.manual_seed(0)
    torch.save(create_model("resnet20_cifar", num_classes=3).state_dict(), tmp_path / "init.pth")
    res = _torchrun(data, tmp_path / "ddp", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    single = tmp_path / "single"
    from resfit.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", str(data), "--out", str(single), "--device", "cpu", *ARGS, *extra]
    )
    train(config_from_args(args))

    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(single / "model.safetensors"))
    assert not torch.equal(
        a["fc.weight"], torch.load(tmp_path / "init.pth")["fc.weight"]
    )  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    # rank 0 alone wrote the run folder and logged
    with open(tmp_path / "ddp" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # Sharded validation: each rank scored half of val, and the gathered metrics are those of
    # one process scoring all of it.
    assert "rank 0 validates 24 of the 48 validation images" in res.stderr
    with open(single / "metrics.csv") as f:
        one = list(csv.DictReader(f))
    for r, o in zip(rows, one, strict=True):
        for k in ("val_loss", "val_acc"):
            assert float(r[k]) == pytest.approx(float(o[k]), rel=1e-4, abs=1e-6), k
    assert res.stderr.count("epoch 2/2") == 1


def test_two_ranks_stream_disjoint_files_and_match_one_process_with_augmentation(
    data: Path, tmp_path: Path
) -> None:
    # Stream mode: each rank opens only the files of its batch slots, and each image's
    # augmentation is seeded by the image and the step, not by the rank: so even with random
    # augmentation two processes train the same weights as one.
    extra = ["--freeze", "backbone", "--weights", str(tmp_path / "init.pth"), "--data-mode",
             "stream", "--augment", "light", "--workers", "1"]  # fmt: skip
    from resfit.models.weights import create_model

    torch.manual_seed(0)
    torch.save(create_model("resnet20_cifar", num_classes=3).state_dict(), tmp_path / "init.pth")
    res = _torchrun(data, tmp_path / "ddp", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    # (rank 0 logs; tests/test_stream.py follows both ranks' reads and finds them disjoint)
    assert "rank 0 opens 24 of the 48 training images" in res.stderr
    # The one-process run in a process of its own: its stream workers are children of that
    # process, not of pytest's (which then goes on to start and reap torchrun's).
    single = subprocess.run([sys.executable, "-m", "resfit", "train", str(data), "--out",
                             str(tmp_path / "single"), "--device", "cpu", *ARGS, *extra],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_sync_bn_on_cpu_is_refused_with_a_clear_message(data: Path, tmp_path: Path) -> None:
    res = _torchrun(data, tmp_path / "ddp", "--sync-bn")
    assert res.returncode != 0
    assert "--sync-bn needs GPUs" in res.stderr


def test_single_process_api_ignores_distributed_settings(data: Path, tmp_path: Path) -> None:
    r = train(TrainConfig.from_options(data=str(data), out=str(tmp_path / "r"), arch="resnet20_cifar", img_size=16,
                          epochs=1, batch_size=16, progress=False, report=False))  # fmt: skip
    assert len(r.history) == 1

"""Knowledge distillation (resfit distill): the loss against a hand computation, tiny distilled
runs (single- and multi-label) that are ordinary run folders, and the teacher's checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import resfit
from resfit.core.errors import ConfigError
from resfit.inference.predictor import Predictor
from resfit.tasks.multi import MultiLabel
from resfit.tasks.single import SingleLabel

from .images import make_colour_folder
from .test_multilabel import make_squares

TINY = dict(img_size=16, batch_size=16, progress=False, report=False, precise_bn=32, lr=0.1)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=12)


@pytest.fixture(scope="module")
def teacher(colours: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    resfit.train(data=str(colours), out=str(out), arch="resnet20_cifar", epochs=2, **TINY)
    return out


def test_single_label_distill_loss_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    T, w = 3.0, 0.25
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = sum(float(pt[i, j] * math.log(pt[i, j] / ps[i, j])) for i in range(4) for j in range(3))
    ce = -sum(math.log(torch.softmax(s, 1)[i, y[i]]) for i in range(4)) / 4
    want = (1 - w) * T * T * kl / 4 + w * ce
    got = SingleLabel().distill_loss(s, t, y, T, w)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # The teacher's own logits cost nothing at weight 0; the student's logits get a gradient.
    assert SingleLabel().distill_loss(t, t, y, T, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_multilabel_distill_loss_is_the_binary_kl_per_class() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    y = (torch.rand(3, 4) > 0.5).float()
    T, w = 2.0, 0.5
    ps, pt = torch.sigmoid(s / T), torch.sigmoid(t / T)
    kl = pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))
    bce = -(y * torch.log(torch.sigmoid(s)) + (1 - y) * torch.log(1 - torch.sigmoid(s))).mean()
    want = (1 - w) * T * T * kl.mean() + w * bce
    got = MultiLabel().distill_loss(s, t, y, T, w)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_distilled_student_is_an_ordinary_run_that_predicts(
    teacher: Path, colours: Path, tmp_path: Path
) -> None:
    from resfit.cli import main

    out = tmp_path / "student"
    argv = ["distill", str(teacher), str(colours), "--student", "resnet20_cifar", "--out",
            str(out), "--epochs", "2", "--img-size", "16", "--batch-size", "16", "--lr", "0.1",
            "--no-progress", "--no-report", "--precise-bn", "32"]  # fmt: skip
    assert main(argv) == 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # a header and 2 epochs
    cfg = (out / "config.json").read_text()
    assert str(teacher) in cfg and '"mixup": 0.8' in cfg  # mixing on by default
    assert "teacher" in (out / "train.log").read_text()
    preds, skipped = Predictor.from_run(out).predict([str(colours / "val")])
    assert not skipped and len(preds) == 36
    assert {p.label for p in preds} <= {"red", "green", "blue"}


def test_multilabel_student_distils_from_a_multilabel_teacher(tmp_path: Path) -> None:
    csv = make_squares(tmp_path / "squares", {"train": 24, "val": 12})
    t = tmp_path / "teacher"
    resfit.train(data=str(csv), out=str(t), arch="resnet20_cifar", epochs=1, **TINY)
    out = tmp_path / "student"
    r = resfit.distill(t, csv, student="resnet20_cifar", out=out, epochs=1, hard_weight=0.3,
                       temperature=2.0, **TINY)  # fmt: skip
    assert r.config.data.task == "multilabel" and "val_mAP" in r.history[0]
    preds, _ = Predictor.from_run(out).predict([str(tmp_path / "squares" / "val_000.png")])
    assert preds[0].probabilities is not None and len(preds[0].probabilities) == 3


def test_a_folder_that_is_not_a_run_is_a_clear_error(colours: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher .*not a finished resfit run"):
        resfit.distill(tmp_path, colours, student="resnet20_cifar", out=tmp_path / "s", **TINY)


def test_a_teacher_of_other_classes_is_refused(
    teacher: Path, colours: Path, tmp_path: Path
) -> None:
    data = tmp_path / "two"
    for split in ("train", "val"):
        for c in ("red", "green"):
            shutil.copytree(colours / split / c, data / split / c)
    with pytest.raises(ConfigError, match="classes .*red.*same names, same order"):
        resfit.distill(teacher, data, student="resnet20_cifar", out=tmp_path / "s", **TINY)


def test_the_cli_reads_teacher_data_and_student() -> None:
    from resfit.cli import build_parser

    args = build_parser().parse_args(
        ["distill", "T", "D", "--student", "resnet18", "--out", "o", "--temperature", "2"]
    )
    assert (args.teacher, args.data, args.arch, args.out) == ("T", "D", "resnet18", "o")
    assert args.temperature == 2.0 and args.func.__name__ == "cmd_distill"
    with pytest.raises(ConfigError, match="--hard-weight must be in"):
        resfit.TrainConfig.from_options(hard_weight=1.5).check()


def test_qat_model_exports_to_int8_that_agrees_with_its_fp32(
    teacher: Path, colours: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torchao")
    pytest.importorskip("onnxruntime")
    from resfit.export.run import export_run

    out = tmp_path / "qat"
    resfit.distill(teacher, colours, student="resnet20_cifar", out=out, epochs=2, qat=1, **TINY)
    log = (out / "train.log").read_text()
    assert "quantization-aware training" in log
    # The fp32 model is an ordinary one: PyTorch predicts with it.
    preds, _ = Predictor.from_run(out).predict([str(colours / "val" / "red")])
    assert len(preds) == 12
    best = json.loads((out / "summary.json").read_text())["best_epoch"]
    if best == 1:  # the fp32 epoch stayed the best: no int8 state of another epoch is kept
        assert not (out / "model.qat.safetensors").exists()
        assert "no quantization-aware epoch beat epoch 1" in log
        return
    from safetensors import safe_open

    for name in ("model.safetensors", "model.qat.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata()["epoch"] == "2", name  # the int8 state of the model's epoch
    report = export_run(out, int8=True)  # no --calib: the QAT graph's own ranges
    assert report["int8_from"] == "qat" and report["calib_images"] == 0
    assert report["val_images"] == 36 and report["top1_agreement"] >= 0.85


def test_qat_state_is_kept_only_from_the_models_epoch(tmp_path: Path, caplog) -> None:
    """model.safetensors keeps the best epoch: the QAT state is written only by a QAT epoch
    that is the best so far; a best epoch before QAT leaves none (and says so), and a state
    of another epoch than the model's is refused at export."""
    import logging
    from types import SimpleNamespace

    from safetensors.torch import save_file
    from torch import nn

    from resfit.core.errors import RunError
    from resfit.runs import load_qat_model
    from resfit.training.callbacks import BestModel
    from resfit.training.qat import QuantizationAware

    qat = QuantizationAware(qat_epochs=2, epochs=3, run=tmp_path, main=True)  # epochs 2 and 3
    qat.graph = nn.Linear(2, 2)  # stands for the fake-quantized graph: its state is written
    best = BestModel("val_acc")
    best.best_epoch = 1

    def try_write(path, write) -> bool:
        write()
        return True

    loop = SimpleNamespace(improved=False, epoch=1, try_write=try_write, net=None,
                           step=SimpleNamespace(precision="fp32"),
                           callback=lambda kind: best if kind is BestModel else None)  # fmt: skip
    qat._plain = (None, "bf16")
    for epoch in (1, 2):  # neither QAT epoch beats epoch 1
        loop.epoch = epoch
        qat.after_epoch(loop)
    assert not (tmp_path / "model.qat.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="resfit"):
        qat.after_fit(loop)
    assert "no quantization-aware epoch beat epoch 1" in caplog.text
    assert loop.step.precision == "bf16"  # the plain step is back
    # A QAT state from epoch 3 beside a model of epoch 1 (a run of an older resfit): refused.
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"), {"epoch": "1"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.qat.safetensors"), {"epoch": "3"})
    with pytest.raises(RunError, match="state of epoch 3, model.safetensors is epoch 1's"):
        load_qat_model(tmp_path)
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.qat.safetensors"), {"epoch": "1"})
    assert float(load_qat_model(tmp_path)["w"]) == 1.0

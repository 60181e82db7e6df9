"""The training core: frozen config, the loop's guards (fp16 loss scaling, early stopping that
survives a resume and is decided on rank 0), EMA of the weights, and keeping a head whose
classes are the user's (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resfit.core.config import TrainConfig
from resfit.core.defaults import resolve_config
from resfit.core.errors import ConfigError
from resfit.models import transfer
from resfit.models.resnet import build_model
from resfit.models.weights import CIFAR10_CLASSES
from resfit.tasks.single import SingleLabel
from resfit.training import TrainStep, train

from .images import make_colour_folder

FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=16, progress=False, report=False,
            leakage="off", precision="fp32")  # fmt: skip


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=16)


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


# -- configuration -----------------------------------------------------------------------------


def test_config_is_frozen_and_resolving_returns_a_new_one() -> None:
    cfg = TrainConfig.from_options(data="d", lr=0.1, freeze="layer2", mixup=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    resolved = resolve_config(
        cfg, ["a", "b"], {"input_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}, 224
    )
    assert resolved is not cfg and cfg.model.img_size is None and cfg.classes == []
    assert resolved.model.img_size == 32 and resolved.classes == ["a", "b"]
    assert resolved.optim.weight_decay == 5e-4 and resolved.optim.lr == 0.1
    again = TrainConfig.from_dict(json.loads(json.dumps(resolved.to_dict())))
    assert again.to_dict() == resolved.to_dict()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(optimizer="rmsprop"), "--optimizer must be one of sgd, adam, adamw"),
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(lr=-1.0), "--lr must be positive"),
        (dict(freeze="layer9"), "--freeze must be one of"),
        (dict(nonsense=1), "unknown option 'nonsense'"),
    ],
)
def test_bad_options_raise_config_errors_that_name_them(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_options(**options).check()


# -- defect 3: fp16 trains with a GradScaler ---------------------------------------------------


def _fp16_grads(scaled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet20_cifar", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def tiny_loss(logits, y):  # a loss whose gradients sit below fp16's smallest number
        return SingleLabel().loss(logits, y) * 1e-6

    scaler = torch.amp.GradScaler("cpu") if scaled else None
    step = TrainStep(opt, tiny_loss, torch.device("cpu"), "fp16", scaler=scaler)
    step(model, torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,)))
    return [m.weight.grad for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_fp16_gradients_underflow_without_loss_scaling_and_survive_with_it() -> None:
    unscaled, scaled = _fp16_grads(False), _fp16_grads(True)
    # The first convolutions' gradients pass through many fp16 ops: they flush to zero.
    assert sum(int(g.count_nonzero()) for g in unscaled[:4]) == 0
    assert all(int(g.count_nonzero()) > 0 for g in scaled[:4])


def test_training_in_fp16_uses_a_grad_scaler(colours: Path, tmp_path: Path, monkeypatch) -> None:
    from resfit.core import runtime

    # fp16 autocast is what `auto` picks on pre-Ampere GPUs; CPUs run it too, slowly.
    monkeypatch.setattr(runtime, "pick_precision", lambda device, precision="auto": "fp16")
    r = train(data=str(colours), out=str(tmp_path / "run"), epochs=2, lr=0.05,
              **{**FAST, "precision": "auto"})  # fmt: skip
    assert len(r.history) == 2 and all(
        torch.isfinite(torch.tensor(h["val_loss"])) for h in r.history
    )
    scaler = _ckpt(tmp_path / "run")["callbacks"]["GradScaling"]
    assert scaler["scale"] > 0


# -- defect 7: early stopping resumes where it was, decided on rank 0 --------------------------


def _stop_at_epoch(n: int, monkeypatch) -> None:
    real, calls = transfer.lr_phase, []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt  # the user pressed Ctrl-C as epoch n started
        return real(*args)

    monkeypatch.setattr(transfer, "lr_phase", interrupt)


def test_a_resumed_run_stops_early_at_the_same_epoch(
    colours: Path, tmp_path: Path, monkeypatch
) -> None:
    # lr ~ 0: nothing improves after epoch 1, so patience 3 stops after epoch 4.
    opts = dict(data=str(colours), epochs=10, lr=1e-12, early_stopping=3, augment="none", **FAST)
    whole = train(out=str(tmp_path / "whole"), **opts)
    assert len(whole.history) == 4
    _stop_at_epoch(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(out=str(tmp_path / "cut"), **opts)
    monkeypatch.undo()
    assert _ckpt(tmp_path / "cut")["epoch"] == 2
    resumed = train(out=str(tmp_path / "cut"), resume=True)
    assert len(resumed.history) == 4  # patience was 1 short already: not reset to 3


def _rank0_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from resfit.training.distributed import Dist, from_rank0

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    got = from_rank0([float(rank), 10.0 + rank], Dist(rank, 2), torch.device("cpu"))
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_decisions_come_from_rank_0_on_every_rank(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank0_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [0.0, 10.0]


# -- EMA ---------------------------------------------------------------------------------------


def test_ema_is_validated_and_saved_as_the_runs_model(colours: Path, tmp_path: Path) -> None:
    run = tmp_path / "ema"
    r = train(data=str(colours), out=str(run), epochs=3, ema=True, ema_decay=0.9, **FAST)
    ck = _ckpt(run)
    averaged = ck["callbacks"]["WeightAveraging"]["averaged"]
    model = load_file(str(run / "model.safetensors"))
    best = r.best_epoch
    assert best >= 1 and "n_averaged" in averaged
    raw = ck["model"]
    key = "layer3.2.conv2.weight"
    assert not torch.allclose(model[key], raw[key])  # the run keeps the average, not the raw
    if best == 3:
        torch.testing.assert_close(model[key], averaged[f"module.{key}"])
    log = (run / "train.log").read_text()
    assert "EMA of the weights with decay 0.90000" in log


def test_ema_resumes_and_works_with_the_feature_cache(
    colours: Path, tmp_path: Path, monkeypatch
) -> None:
    torch.manual_seed(0)
    from resfit.models.weights import create_model

    torch.save(create_model("resnet20_cifar", num_classes=3).state_dict(), tmp_path / "init.pth")
    opts = dict(data=str(colours), epochs=3, ema=True, freeze="layer2", augment="none",
                cache="memory", cache_dtype="fp32", weights=str(tmp_path / "init.pth"), **FAST)  # fmt: skip
    train(out=str(tmp_path / "whole"), **opts)
    assert "feature cache: --freeze layer2" in (tmp_path / "whole" / "train.log").read_text()
    _stop_at_epoch(3, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(out=str(tmp_path / "cut"), **opts)
    monkeypatch.undo()
    train(out=str(tmp_path / "cut"), resume=True)
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    init = torch.load(tmp_path / "init.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(a["layer1.0.conv1.weight"], init["layer1.0.conv1.weight"])


# -- defect 9: keep the head when the classes are the weights' own -----------------------------


@pytest.mark.parametrize("weights", ["file", "resnet20_cifar.cifar10"])
def test_cifar_weights_keep_their_head_on_cifar_classes(
    cifar_mirror: Path, tmp_path: Path, weights: str
) -> None:
    """The checkpoint as a registered name, or as the file a user downloaded (recognised by
    its sha256: the file alone does not say which classes its head is for)."""
    from .conftest import CIFAR_CKPTS
    from .images import colour_image

    if weights == "file":
        weights = str(CIFAR_CKPTS / "resnet20-12fca82f.th")

    rng = __import__("numpy").random.default_rng(0)
    for split in ("train", "val"):
        for cls in CIFAR10_CLASSES:
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(2):
                colour_image((120, 120, 120), rng, 32).save(
                    tmp_path / "d" / split / cls / f"{i}.png"
                )
    run = tmp_path / "run"
    train(data=str(tmp_path / "d"), out=str(run), weights=weights, epochs=1,
          lr=1e-12, batch_size=8, arch="resnet20_cifar", progress=False, report=False,
          leakage="off", precision="fp32", precise_bn=0)  # fmt: skip
    assert "keeping the weights' 10-class head" in (run / "train.log").read_text()
    from resfit.models.weights import create_model

    pretrained = create_model("resnet20_cifar", weights="resnet20_cifar.cifar10", progress=False)
    trained = load_file(str(run / "model.safetensors"))
    torch.testing.assert_close(trained["fc.weight"], pretrained.state_dict()["fc.weight"])


# -- defect 13: each process its share of the cores, also through the API ----------------------


def test_train_takes_the_threads_option(colours: Path, tmp_path: Path) -> None:
    code = (
        "import torch, resfit;"
        f"resfit.train(data={str(colours)!r}, out={str(tmp_path / 'r')!r}, epochs=1, threads=1,"
        " arch='resnet20_cifar', img_size=16, progress=False, report=False, leakage='off');"
        "print(torch.get_num_threads())"
    )
    env = {**os.environ, "RESFIT_PROC_DIR": str(tmp_path / "procs")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "1"

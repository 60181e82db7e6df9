"""Device/precision choice and the PyTorch inference fast path (prepare_for_inference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resfit.core import runtime
from resfit.core.runtime import autocast, pick_device, pick_precision
from resfit.inference.folding import fold_conv_bn, prepare_for_inference
from resfit.models.resnet import build_model

from .test_export import cifar_batch, pretrained_resnet20

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    return pretrained_resnet20(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),  # this project's machine: bf16 is emulated
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),  # Cooper Lake / Zen 4
        ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
        (set(), "fp32"),  # flags unreadable (not Linux)
    ],
)
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, flags, expected) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    assert pick_precision(CPU, "auto") == expected
    assert prepare_for_inference(nn.Linear(2, 2), CPU).precision == expected


@pytest.mark.parametrize(("bf16_ok", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16_ok, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert pick_precision(torch.device("cuda"), "auto") == expected


def test_explicit_precisions_are_checked() -> None:
    assert pick_precision(CPU, "bf16") == "bf16"  # allowed, only slow where not native
    with pytest.raises(ValueError, match="needs a GPU"):
        pick_precision(CPU, "fp16")
    with pytest.raises(ValueError, match="one of"):
        pick_precision(CPU, "fp8")
    with pytest.raises(ValueError, match="ONNX"):
        prepare_for_inference(nn.Linear(2, 2), CPU, "int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_autocast_is_a_no_op_for_fp32_only() -> None:
    a = torch.randn(4, 4)
    with autocast(CPU, "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_fast_path_agrees_with_fp32_on_real_images(model) -> None:
    x, y = cifar_batch("test", 50)
    with torch.no_grad():
        ref = model(x)
    fast = prepare_for_inference(model, CPU, "fp32")
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert (out - ref).abs().max() < 1e-3  # folding only reorders float arithmetic

    # bf16 really runs in bf16 (logits move) yet keeps the decisions: measured 99.35 % on
    # 2,000 test images.
    low = prepare_for_inference(model, CPU, "bf16")(x)
    assert (low - ref).abs().max() > 1e-3
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    assert (low.argmax(1) == y).float().mean() > 0.75


def test_fast_path_never_changes_the_users_model(model) -> None:
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fast = prepare_for_inference(model, CPU, "fp32")
        assert model.training
        assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        model.eval()
    run = fast.module
    assert not run.training and fast.folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in run.modules())
    assert run.conv1.bias is not None


def test_folding_is_exact_on_imagenet_resnets_and_skips_unknown_orders() -> None:
    torch.manual_seed(0)
    net = build_model("resnet50").eval()
    for m in net.modules():  # non-trivial statistics, or folding would be a near no-op
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    folded = fold_conv_bn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # incl. downsample
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-3, atol=1e-3)

    # BN *before* the conv is not conv -> BN: it must stay.
    pre = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    assert isinstance(fold_conv_bn(pre)[0], nn.BatchNorm2d)


def test_a_torchvision_resnet_folds_every_bn_through_its_adapter() -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    folded = fold_conv_bn(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # stem and blocks too
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-3, atol=1e-3)


def test_compile_failure_falls_back_to_eager(monkeypatch, model) -> None:
    def broken(module: nn.Module):
        def fn(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no C++ compiler found")

        return fn

    monkeypatch.setattr(torch, "compile", broken)
    fast = prepare_for_inference(model, CPU, "fp32", compile=True)
    x = cifar_batch("test", 50)[0][:8]
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        out = fast(x)
    assert not fast.compiled
    with torch.no_grad():
        assert (out.argmax(1) == model(x).argmax(1)).all()

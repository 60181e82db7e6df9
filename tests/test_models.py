"""The ResNet family against torchvision (the oracle) and the paper's CIFAR definitions."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

import resfit
from resfit.core.errors import WeightsError
from resfit.models.resnet import BasicBlock, Bottleneck, ZeroPadShortcut, build_model

IMAGENET_DEPTHS = [18, 34, 50, 101, 152]
TV_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomise_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Non-trivial BN statistics so that eval-mode parity tests every buffer, not just weights.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.25)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_resnet_matches_torchvision(depth: int) -> None:
    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()
    _randomise_bn(tv, torch.Generator().manual_seed(depth))
    ours = build_model(f"resnet{depth}").eval()
    assert n_params(ours) == n_params(tv) == TV_PARAMS[depth]
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = tv(x), ours(x)
    assert expected.abs().max() > 1e-2  # a meaningful signal, not all zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_v1_and_v1_5_differ_only_in_where_the_stride_sits() -> None:
    v15, v1 = build_model("resnet50"), build_model("resnet50_v1")
    assert {k: v.shape for k, v in v15.state_dict().items()} == {
        k: v.shape for k, v in v1.state_dict().items()
    }
    first = v15.layer2[0], v1.layer2[0]
    assert first[0].conv1.stride == (1, 1) and first[0].conv2.stride == (2, 2)
    assert first[1].conv1.stride == (2, 2) and first[1].conv2.stride == (1, 1)
    v1.load_state_dict(v15.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = v15.eval()(x), v1.eval()(x)
    assert a.shape == b.shape and not torch.allclose(a, b)


CIFAR_PARAMS = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
}  # 110: 853,018 + 9 x 97,216 per extra block triple


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_resnet_parameter_counts_match_the_paper(depth: int) -> None:
    model = build_model(f"resnet{depth}_cifar")
    assert n_params(model) == CIFAR_PARAMS[depth]
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * (depth - 2) // 6
    # Option A: exactly two parameter-free zero-padding shortcuts, where the stages change width.
    pads = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(pads) == 2 and all(n_params(p) == 0 for p in pads)


def test_cifar_option_b_adds_projection_shortcuts() -> None:
    a = build_model("resnet20_cifar")
    b = build_model("resnet20_cifar", shortcut="B")
    # two 1x1 projections (16->32, 32->64) with their BN
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", resfit.list_models())
def test_forward_and_backward_every_architecture(name: str) -> None:
    size = 32 if "cifar" in name else 64
    model = build_model(name, num_classes=7)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0


def test_stage_access_composes_to_the_full_forward() -> None:
    model = build_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        stages = model.forward_stages(x)
        assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4"]
        assert stages["layer3"].shape == (2, 256, 4, 4)
        torch.testing.assert_close(
            model.forward_from(model.forward_to(x, "layer2"), "layer2"), full
        )
        assert model.forward_features(x).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown stage"):
        model.forward_to(x, "layer9")


def test_kaiming_init_and_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", zero_init_residual=True)
    conv = model.layer3[0].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.modules() if isinstance(b, Bottleneck))
    # With every residual branch at zero, a block with an identity shortcut passes x through.
    block = model.layer1[1].eval()
    x = torch.rand(1, 256, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*Did you mean"):
        build_model("resnet5")


def _save_tv_checkpoint(tmp_path, depth: int = 18) -> tuple:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_create_model_loads_a_torchvision_checkpoint_file(tmp_path) -> None:
    tv, path = _save_tv_checkpoint(tmp_path)
    model = resfit.create_model("resnet18", weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))


def test_new_num_classes_replaces_the_head_and_says_so(tmp_path, caplog) -> None:
    tv, path = _save_tv_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="resfit"):
        model = resfit.create_model("resnet18", weights=path, num_classes=5)
    assert "replacing the 1000-class head" in caplog.text
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_in_chans_1_sums_the_rgb_filters(tmp_path) -> None:
    tv, path = _save_tv_checkpoint(tmp_path)
    grey = resfit.create_model("resnet18", weights=path, in_chans=1, num_classes=3).eval()
    rgb = resfit.create_model("resnet18", weights=path, num_classes=3).eval()
    rgb.fc.load_state_dict(grey.fc.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    assert grey.conv1.weight.shape == (64, 1, 7, 7)
    x.requires_grad_(True)
    grey(x).sum().backward()


def test_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    _, path = _save_tv_checkpoint(tmp_path, depth=18)
    with pytest.raises(WeightsError, match="does not fit architecture 'resnet34'"):
        resfit.create_model("resnet34", weights=path)

"""The model-adapter seam: stages, first conv, head and forward splits, for resfit's ResNets,
torchvision's, and an architecture registered by a user."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision
from torch import Tensor, nn

from resfit.core.errors import ConfigError
from resfit.inference.explain import grad_cam
from resfit.inference.folding import fold_conv_bn
from resfit.models import adapters
from resfit.models.adapters import ModelAdapter, adapt, has_adapter, register_adapter
from resfit.models.resnet import ResNet, build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    # Non-trivial BN statistics and affine terms, so a stage run twice or skipped shows.
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


MODELS = {
    "resnet20_cifar": lambda: build_model("resnet20_cifar", num_classes=7),
    "resnet20_cifar_B": lambda: build_model("resnet20_cifar", shortcut="B"),
    "plain20_cifar": lambda: build_model("plain20_cifar"),
    "resnet18": lambda: build_model("resnet18", num_classes=5),
    "resnet50": lambda: build_model("resnet50", num_classes=5),
    "torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "torchvision_resnet50": lambda: torchvision.models.resnet50(num_classes=5),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_stage_modules_and_head_hold_every_parameter_exactly_once(name: str) -> None:
    model = MODELS[name]()
    a = adapt(model)
    assert a.stage_names[0] == "stem" and len(a.stage_names) in (4, 5)
    mods = [m for s in a.stage_names for m in a.stage_modules(s)] + [a.head]
    seen = Counter(id(p) for m in mods for p in m.parameters())
    assert set(seen) == {id(p) for p in model.parameters()}
    assert max(seen.values()) == 1
    assert a.stage_modules("stem") == [a.first_conv, model.bn1]
    assert a.name_of(a.first_conv) == "conv1" and a.name_of(a.head) == "fc"
    assert a.in_chans == 3 and a.num_features == a.head.in_features


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet20_cifar", 32), ("resnet20_cifar_B", 32), ("resnet18", 64),
     ("resnet50", 64), ("torchvision_resnet18", 64)],
)  # fmt: skip
def test_forward_from_forward_to_is_the_model_at_every_stage(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(MODELS[name]())
    a = adapt(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
        assert want.abs().max() > 1e-3  # a real signal, not all zeros
        shapes = []
        for stage in a.stage_names:
            h = a.forward_to(x, stage)
            shapes.append(h.shape[-1])
            torch.testing.assert_close(a.forward_from(h, stage), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.head(a.features(x)), want, rtol=1e-5, atol=1e-5)
        assert a.features(x).shape == (2, a.num_features)
    # The split points really are different places in the network: later stages are smaller.
    assert shapes[-1] < shapes[0] <= size


def test_the_adapter_runs_resfits_own_stage_methods() -> None:
    model = _randomise_bn(build_model("resnet20_cifar"))
    a = adapt(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_to(x, "layer2"), model.forward_to(x, "layer2"))
        torch.testing.assert_close(a.features(x), model.forward_features(x))
    assert a.stage_names == model.stage_names


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet50", "torchvision_resnet18"])
def test_reset_head_changes_the_head_only(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    a = adapt(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_head = a.head
    a.reset_head(11)
    after = model.state_dict()
    head = a.name_of(a.head)
    assert a.head is not old_head and a.head is model.fc
    assert a.num_classes == 11 and a.head.in_features == old_head.in_features
    assert a.head.weight.dtype == torch.float64  # where the old head was
    assert set(after) == set(before)
    changed = {
        k for k in before if not k.startswith(f"{head}.") and not torch.equal(before[k], after[k])
    }
    assert not changed
    assert model.eval()(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 11)


def test_reset_head_draws_as_the_models_own_reset_classifier() -> None:
    # Same seed, same new head: runs recorded before the adapter keep their weights.
    a, b = build_model("resnet20_cifar"), build_model("resnet20_cifar")
    torch.manual_seed(3)
    adapt(a).reset_head(4)
    torch.manual_seed(3)
    b.reset_classifier(4)
    torch.testing.assert_close(a.fc.weight, b.fc.weight, rtol=0, atol=0)


def test_unknown_stage_and_unknown_model_type_are_config_errors() -> None:
    a = adapt(build_model("resnet20_cifar"))
    with pytest.raises(ConfigError, match="unknown stage 'layer4'.*stem, layer1, layer2, layer3"):
        a.forward_to(torch.randn(1, 3, 8, 8), "layer4")
    with pytest.raises(ConfigError, match="unknown stage 'head'"):
        a.stage_modules("head")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert not has_adapter(mlp)
    with pytest.raises(ConfigError, match=r"torch\.nn\.modules\.container\.Sequential.*"
                       r"register_adapter\(Sequential, YourAdapter\)"):  # fmt: skip
        adapt(mlp)

    class Wrapper(nn.Module):  # as DistributedDataParallel holds the model
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    with pytest.raises(ConfigError, match=r"adapt model\.module instead"):
        adapt(Wrapper(build_model("resnet20_cifar")))


def test_subclasses_of_a_registered_type_get_its_adapter() -> None:
    class MyResNet(ResNet):
        pass

    from resfit.models.resnet import BasicBlock

    model = MyResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    assert type(adapt(model)) is adapters.ResNetAdapter
    assert adapt(adapt(model)) is not None and has_adapter(model)


class TinyNet(nn.Module):
    """Not a ResNet: a conv stem, one stage, max pooling and a classifier called ``out``."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.amax(self.body(self.first(x)), dim=(2, 3)))


class TinyAdapter(ModelAdapter):
    stage_names = ("stem", "body")

    def stage_modules(self, name: str) -> list[nn.Module]:
        self.check_stage(name)
        return [self.model.first] if name == "stem" else [self.model.body]

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        return self.stage_modules(name)[0](x)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.model.first[0]

    def set_first_conv(self, conv: nn.Conv2d) -> None:
        self.model.first[0] = conv

    @property
    def head(self) -> nn.Linear:
        return self.model.out

    def set_head(self, head: nn.Linear) -> None:
        self.model.out = head

    def pool(self, h: Tensor) -> Tensor:
        return torch.amax(h, dim=(2, 3))


def test_a_registered_architecture_plugs_into_explain_and_folding(monkeypatch) -> None:
    monkeypatch.setattr(adapters, "ADAPTERS", adapters.ADAPTERS.copy())
    model = _randomise_bn(TinyNet())
    with pytest.raises(ConfigError, match="TinyNet"):
        adapt(model)
    register_adapter(TinyNet, TinyAdapter)
    a = adapt(model)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_from(a.forward_to(x, "stem"), "stem"), model(x))
    assert a.name_of(a.head) == "out" and a.num_features == 16
    a.reset_head(5)
    assert model(x).shape == (1, 5)
    cam = grad_cam(model, x[0], stage="body")
    assert cam.shape == (12, 12) and 0.0 <= cam.min() <= cam.max() <= 1.0
    # Its conv -> BN sits in an nn.Sequential, which folds in any model.
    folded = fold_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_adapter(TinyAdapter, TinyAdapter)  # type: ignore[arg-type]

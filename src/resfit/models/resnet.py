"""The ResNet family: ImageNet ResNets (torchvision layout) and the CIFAR ResNets of the paper.

Knows nothing of weights files, data, training or the CLI. Every model here exposes the same
small interface, which :mod:`resfit.models.adapters` wraps for the rest of resfit (code outside this
module goes through ``adapters.adapt(model)``, never through ``conv1`` or ``fc`` by name):

- ``stage_names``: the names of the stages in order (``stem``, ``layer1`` ...);
- ``forward_to(x, stage)``: the output after ``stage`` (the frozen-prefix feature cache);
- ``forward_from(h, stage)``: continue from that output to the logits;
- ``forward_features(x)``: pooled features before the classifier;
- ``head``: the classifier (``fc``), replaced by ``reset_classifier(num_classes)``.

``residual=False`` builds the *plain twin* of a network: the same layers with every shortcut
removed (projection shortcuts are dropped too, so a plain network has no shortcut parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.registry import Registry

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ModelSpec",
    "ResNet",
    "ZeroPadShortcut",
    "build_model",
    "list_models",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of the paper: subsample by ``stride``, zero-pad the new channels.

    Parameter-free, as in section 4.2 (CIFAR-10).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_before, self.pad_after = extra // 2, extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, add the shortcut, ReLU: y = relu(F(x) + x)."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, add the shortcut, ReLU.

    ``stride_on_3x3=True`` is ResNet v1.5 (torchvision's default, better accuracy);
    ``False`` puts the stride on the first 1x1 as in the original paper (v1).
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        stride_on_3x3: bool = True,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (1, stride) if stride_on_3x3 else (stride, 1)
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


class _StagedNet(nn.Module):
    """Shared stage interface; subclasses define ``_stem``, ``stage_names`` and ``fc``."""

    stage_names: tuple[str, ...]
    fc: nn.Linear

    def _stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        return self._stem(x) if name == "stem" else getattr(self, name)(x)

    def _check_stage(self, stage: str) -> int:
        if stage not in self.stage_names:
            raise ConfigError(f"unknown stage {stage!r}; this model has {list(self.stage_names)}")
        return self.stage_names.index(stage)

    def forward_to(self, x: Tensor, stage: str) -> Tensor:
        """Run the network up to and including ``stage`` and return that stage's output."""
        for name in self.stage_names[: self._check_stage(stage) + 1]:
            x = self._run_stage(name, x)
        return x

    def forward_from(self, h: Tensor, stage: str) -> Tensor:
        """Continue from the output of ``stage`` to the logits."""
        for name in self.stage_names[self._check_stage(stage) + 1 :]:
            h = self._run_stage(name, h)
        return self.fc(torch.flatten(self.avgpool(h), 1))

    def forward_stages(self, x: Tensor) -> dict[str, Tensor]:
        """Every stage's output by name, in order."""
        out: dict[str, Tensor] = {}
        for name in self.stage_names:
            x = self._run_stage(name, x)
            out[name] = x
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """Globally pooled features, the classifier's input."""
        return torch.flatten(self.avgpool(self.forward_to(x, self.stage_names[-1])), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    @property
    def num_features(self) -> int:
        return self.fc.in_features

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes``."""
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_linear(self.fc)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                _init_linear(m)
        if zero_init_residual:
            # Each residual branch starts as zero, so each block starts as the identity.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


def _init_linear(m: nn.Linear) -> None:
    # nn.Linear's own default (uniform, fan-in), as torchvision leaves it.
    m.reset_parameters()


class ResNet(_StagedNet):
    """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool, FC.

    Parameter and buffer names are torchvision's, so its checkpoints load with strict=True.
    """

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        residual: bool = True,
        stride_on_3x3: bool = True,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.stride_on_3x3 = stride_on_3x3
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if self.residual and (stride != 1 or self.inplanes != out_planes):
            # Projection shortcut y = F(x) + W_s x where the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)
            )
        extra = {"stride_on_3x3": self.stride_on_3x3} if block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, self.residual, **extra)]
        self.inplanes = out_planes
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, residual=self.residual, **extra))
        return nn.Sequential(*layers)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class CifarResNet(_StagedNet):
    """CIFAR ResNet of the paper (section 4.2): depth 6n+2, 3x3 stem of 16 filters,
    three stages of 16/32/64 filters with n basic blocks each.

    ``shortcut="A"`` (the paper's CIFAR choice): parameter-free zero-padding shortcuts;
    ``shortcut="B"``: 1x1 projection + BN where the shape changes.
    """

    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "A",
        zero_init_residual: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(
                f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110...), got {depth}"
            )
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut = shortcut
        self.residual = residual
        self.inplanes = 16
        self.conv1 = conv3x3(in_chans, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if self.residual and (stride != 1 or self.inplanes != planes):
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
                )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self.residual)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(planes, planes, residual=self.residual))
        return nn.Sequential(*layers)

    def _stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


# ---------------------------------------------------------------------------------------------
# Builders


def _resnet(block: Block, layers: list[int], **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnet20_cifar(**kwargs) -> CifarResNet:
    return CifarResNet(20, **kwargs)


def resnet32_cifar(**kwargs) -> CifarResNet:
    return CifarResNet(32, **kwargs)


def resnet44_cifar(**kwargs) -> CifarResNet:
    return CifarResNet(44, **kwargs)


def resnet56_cifar(**kwargs) -> CifarResNet:
    return CifarResNet(56, **kwargs)


def resnet110_cifar(**kwargs) -> CifarResNet:
    return CifarResNet(110, **kwargs)


@dataclass(frozen=True)
class ModelSpec:
    """What a model name stands for."""

    name: str
    builder: Callable[..., _StagedNet]
    family: str  # "imagenet" or "cifar"
    residual: bool
    default_input_size: int
    default_num_classes: int
    kwargs: tuple[tuple[str, object], ...] = ()

    def build(self, **kwargs) -> _StagedNet:
        return self.builder(**{**dict(self.kwargs), "residual": self.residual, **kwargs})


MODELS: Registry[str, ModelSpec] = Registry("model", listing="`resfit models` lists them all")


def _register(name: str, builder: Callable[..., _StagedNet], family: str, **kw: object) -> None:
    """An architecture and its plain twin (the same network without shortcuts)."""
    size, classes = (224, 1000) if family == "imagenet" else (32, 10)
    MODELS.register(name, ModelSpec(name, builder, family, True, size, classes, tuple(kw.items())))
    plain = "plain" + name.removeprefix("resnet")
    MODELS.register(
        plain, ModelSpec(plain, builder, family, False, size, classes, tuple(kw.items()))
    )


for _depth, _fn in [
    (18, resnet18),
    (34, resnet34),
    (50, resnet50),
    (101, resnet101),
    (152, resnet152),
]:
    _register(f"resnet{_depth}", _fn, "imagenet")
    if _fn in (resnet50, resnet101, resnet152):
        _register(f"resnet{_depth}_v1", _fn, "imagenet", stride_on_3x3=False)
for _depth, _fn in [(20, resnet20_cifar), (32, resnet32_cifar), (44, resnet44_cifar),
                    (56, resnet56_cifar), (110, resnet110_cifar)]:  # fmt: skip
    _register(f"resnet{_depth}_cifar", _fn, "cifar")


def list_models(include_plain: bool = True) -> list[str]:
    """Every architecture name ``build_model`` and ``resfit.create_model`` accept."""
    return sorted(n for n, s in MODELS.items() if include_plain or s.residual)


def get_spec(name: str) -> ModelSpec:
    return MODELS.get(name)


def build_model(name: str, **kwargs) -> _StagedNet:
    """Build an architecture by name with random (Kaiming) initialisation."""
    return get_spec(name).build(**kwargs)

"""Model adapters: the one interface through which resfit reaches into a network.

Freezing, discriminative learning rates, the frozen-prefix feature cache, Grad-CAM, BN folding
and loading weights all need to know a network's layout: its stages in order, its first
convolution and its classifier. Rather than reach for ``conv1``, ``fc`` or ``avgpool`` by
name, code outside :mod:`resfit.models.resnet` asks the model's adapter::

    a = adapt(model)
    a.stage_names                 # ("stem", "layer1", ..., "layer4")
    a.stage_modules("stem")       # [conv1, bn1]: what freezing the stem freezes
    h = a.forward_to(x, "layer3") # the frozen-prefix cache stores this ...
    logits = a.forward_from(h, "layer3")  # ... and the trainable rest starts from it
    a.reset_head(5)               # a new, freshly initialised 5-class classifier

The adapter is a view: it holds the model and changes it only through ``reset_head`` and
``set_first_conv``. Adapters are chosen by the model's type through a registry, so a new
architecture plugs in with :func:`register_adapter` and no change anywhere else. resfit's
``ResNet``/``CifarResNet`` are registered, and so is torchvision's ``ResNet`` (a user can bring
``torchvision.models.resnet50()``); torchvision is not imported until such a model shows up.

Imports only :mod:`resfit.models.resnet` and :mod:`resfit.core.errors`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet

__all__ = [
    "ModelAdapter",
    "ResNetAdapter",
    "TorchvisionResNetAdapter",
    "adapt",
    "has_adapter",
    "register_adapter",
]


class ModelAdapter:
    """The layout of one network, for the code that trains, freezes, explains and loads it.

    A subclass for a new architecture sets ``stage_names`` and implements ``stage_modules``,
    ``run_stage``, ``first_conv``, ``set_first_conv``, ``head``, ``set_head`` and ``pool``;
    everything else follows from those. The stages, run in order, then ``pool`` and ``head``,
    must compute exactly ``model(x)``, and ``stage_modules`` of every stage together with the
    head must hold every parameter of the model exactly once.
    """

    stage_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- what a subclass provides ---------------------------------------------------------

    def stage_modules(self, name: str) -> list[nn.Module]:
        """The modules that make up stage ``name`` (for ``stem``: the first conv and its BN)."""
        raise NotImplementedError

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        """Stage ``name`` applied to ``x`` (the previous stage's output)."""
        raise NotImplementedError

    @property
    def first_conv(self) -> nn.Conv2d:
        """The convolution that sees the input image; its ``in_channels`` is the model's."""
        raise NotImplementedError

    def set_first_conv(self, conv: nn.Conv2d) -> None:
        """Put ``conv`` in the first convolution's place (to change the input channels)."""
        raise NotImplementedError

    @property
    def head(self) -> nn.Linear:
        """The classifier: pooled features in, one logit per class out."""
        raise NotImplementedError

    def set_head(self, head: nn.Linear) -> None:
        """Put ``head`` in the classifier's place."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """Global pooling of the last stage's output to an N x ``num_features`` batch."""
        raise NotImplementedError

    # -- what follows from it -------------------------------------------------------------

    @property
    def num_features(self) -> int:
        """The width of the pooled features, the classifier's input."""
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def in_chans(self) -> int:
        return self.first_conv.in_channels

    def check_stage(self, stage: str) -> int:
        """The index of ``stage`` in ``stage_names``; a ConfigError naming the valid ones if
        there is no such stage."""
        if stage not in self.stage_names:
            raise ConfigError(
                f"unknown stage {stage!r}; {type(self.model).__name__} has stages "
                f"{', '.join(self.stage_names)}"
            )
        return self.stage_names.index(stage)

    def forward_to(self, x: Tensor, stage: str) -> Tensor:
        """Run the network up to and including ``stage`` and return that stage's output."""
        for name in self.stage_names[: self.check_stage(stage) + 1]:
            x = self.run_stage(name, x)
        return x

    def forward_from(self, h: Tensor, stage: str) -> Tensor:
        """Continue from the output of ``stage`` to the logits."""
        for name in self.stage_names[self.check_stage(stage) + 1 :]:
            h = self.run_stage(name, h)
        return self.head(self.pool(h))

    def features(self, x: Tensor) -> Tensor:
        """Globally pooled features of ``x``, the classifier's input."""
        return self.pool(self.forward_to(x, self.stage_names[-1]))

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes``, on the
        old one's device and dtype. Nothing else in the model changes."""
        old = self.head
        new = nn.Linear(self.num_features, num_classes)
        self.set_head(new.to(old.weight.device, old.weight.dtype))

    def name_of(self, module: nn.Module) -> str:
        """The qualified name of ``module`` in the model, its prefix in the state dict
        (``adapt(m).name_of(adapt(m).head) == "fc"``)."""
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise ValueError(f"{type(module).__name__} is not a part of {type(self.model).__name__}")

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """``(parent, conv, bn)``: attributes of ``parent`` whose forward computes exactly
        ``bn(conv(x))``, so that BN can be folded into the conv for inference. Only what the
        adapter knows for certain, beyond ``nn.Sequential`` chains (folded in any model);
        the default knows nothing more."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, stages={self.stage_names})"


class _ResNetLayout(ModelAdapter):
    """The torchvision ResNet layout, which resfit's networks share: ``conv1``/``bn1`` stem,
    stages ``layer1``..., ``avgpool``, ``fc``; inside every block ``convN`` feeds ``bnN``."""

    # Module types whose ``convN`` attribute feeds ``bnN`` directly (set by subclasses).
    _chained: tuple[type[nn.Module], ...] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.stage_names = ("stem",) + tuple(
            n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)
        )

    def stage_modules(self, name: str) -> list[nn.Module]:
        self.check_stage(name)
        m = self.model
        return [m.conv1, m.bn1] if name == "stem" else [getattr(m, name)]

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.model.conv1

    def set_first_conv(self, conv: nn.Conv2d) -> None:
        self.model.conv1 = conv

    @property
    def head(self) -> nn.Linear:
        return self.model.fc

    def set_head(self, head: nn.Linear) -> None:
        self.model.fc = head

    def pool(self, h: Tensor) -> Tensor:
        return torch.flatten(self.model.avgpool(h), 1)

    def conv_bn_pairs(self) -> list[tuple[nn.Module, str, str]]:
        pairs: list[tuple[nn.Module, str, str]] = []
        for parent in self.model.modules():
            if isinstance(parent, self._chained):
                children = dict(parent.named_children())
                pairs += [
                    (parent, f"conv{i}", f"bn{i}")
                    for i in (1, 2, 3)
                    if isinstance(children.get(f"conv{i}"), nn.Conv2d)
                    and isinstance(children.get(f"bn{i}"), nn.BatchNorm2d)
                ]
        return pairs


class ResNetAdapter(_ResNetLayout):
    """resfit's own ``ResNet`` and ``CifarResNet``: the networks' own stage methods run, so
    the adapter computes exactly what ``model.forward_to`` and friends do."""

    _chained = (ResNet, CifarResNet, BasicBlock, Bottleneck)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.stage_names = tuple(model.stage_names)

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        self.check_stage(name)
        return self.model._run_stage(name, x)

    def forward_to(self, x: Tensor, stage: str) -> Tensor:
        self.check_stage(stage)
        return self.model.forward_to(x, stage)

    def forward_from(self, h: Tensor, stage: str) -> Tensor:
        self.check_stage(stage)
        return self.model.forward_from(h, stage)

    def features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def reset_head(self, num_classes: int) -> None:
        # The model's own method: the same initialisation (and random draws) as ever.
        old = self.head.weight
        self.model.reset_classifier(num_classes)
        self.model.fc.to(old.device, old.dtype)


class TorchvisionResNetAdapter(_ResNetLayout):
    """``torchvision.models.ResNet`` (resnet18 ... resnet152, wide_resnet, resnext)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from torchvision.models import resnet as tv

        self._chained = (tv.ResNet, tv.BasicBlock, tv.Bottleneck)

    def run_stage(self, name: str, x: Tensor) -> Tensor:
        self.check_stage(name)
        m = self.model
        if name == "stem":
            return m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return getattr(m, name)(x)


AdapterFactory = Callable[[nn.Module], ModelAdapter]

ADAPTERS: Registry[type, AdapterFactory] = Registry("model adapter")
# Registered by qualified class name, so that torchvision is imported only when one of its
# models is adapted (and then it is imported already).
_BY_NAME: dict[str, AdapterFactory] = {
    "torchvision.models.resnet.ResNet": TorchvisionResNetAdapter,
}


def register_adapter(cls: type[nn.Module], factory: AdapterFactory) -> None:
    """Make :func:`adapt` use ``factory(model)`` for models of type ``cls`` and its
    subclasses (a later registration for the same type replaces the earlier one)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_adapter needs an nn.Module subclass, got {cls!r}")
    if not callable(factory):
        raise TypeError(f"register_adapter needs a callable factory, got {factory!r}")
    ADAPTERS.register(cls, factory, replace=True)


register_adapter(ResNet, ResNetAdapter)
register_adapter(CifarResNet, ResNetAdapter)


def _factory(model: nn.Module) -> AdapterFactory | None:
    # The most specific registered type wins: walk the MRO from the model's own class.
    for klass in type(model).__mro__:
        if klass in ADAPTERS:
            return ADAPTERS.get(klass)
        found = _BY_NAME.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


def has_adapter(model: nn.Module) -> bool:
    """Whether :func:`adapt` knows ``model``'s type."""
    return isinstance(model, ModelAdapter) or _factory(model) is not None


def adapt(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """The adapter for ``model``, picked by its type (an adapter is returned as it is).

    An unknown type is a ConfigError that names it and says how to register one.
    """
    if isinstance(model, ModelAdapter):
        return model
    factory = _factory(model)
    if factory is None:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        wrapped = next((a for a in ("module", "_orig_mod") if isinstance(
            getattr(model, a, None), nn.Module)), None)  # fmt: skip
        hint = (
            f" It wraps a model: adapt model.{wrapped} instead."
            if wrapped
            else " Subclass resfit.models.adapters.ModelAdapter for it and call "
            f"resfit.models.adapters.register_adapter({type(model).__name__}, YourAdapter)."
        )
        raise ConfigError(
            f"resfit does not know the layout of {kind} (no model adapter is registered for "
            f"it; known: resfit's ResNet and CifarResNet, torchvision's ResNet).{hint}"
        )
    return factory(model)

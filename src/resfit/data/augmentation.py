"""Augmentation presets (torchvision.transforms.v2) and the deterministic eval preprocessing.

Every transform takes a uint8 (3, H, W) tensor whose shorter side is the decode size (see
:func:`decode_size`) and returns a normalised float tensor of ``img_size`` x ``img_size``.

Evaluation follows the weights' own recipe where they state one: torchvision's V2 ImageNet
weights were measured with the shorter side resized to 232 (not 256) before the 224 centre
crop, and a weight may ask for bicubic instead of bilinear. A run records both in its
``config.json`` (``resize_size``, ``interpolation``); :func:`eval_transform` applies them.

Presets:
- ``none``: the eval preprocessing (centre crop), nothing random;
- ``light``: random resized crop and horizontal flip;
- ``standard``: ``light`` plus the classic random affine (rotation, zoom, translation) and
  colour jitter;
- ``strong``: ``light`` plus TrivialAugmentWide (or RandAugment), random erasing, and MixUp /
  CutMix on the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

from ..core.config import AugmentConfig
from ..core.errors import ConfigError
from ..core.presets import PRESETS

# The eval preprocessing lives beside, without torchvision; re-exported for existing callers.
from .preprocessing import (
    EvalPreprocessing,
    EvalTransform,
    base_size_for,
    decode_size,
    for_channels,
)

__all__ = [
    "INTERPOLATIONS",
    "PRESETS",
    "AugmentConfig",
    "EvalPreprocessing",
    "base_size_for",
    "batch_transform",
    "decode_size",
    "eval_transform",
    "for_channels",
    "interpolation_mode",
    "preview_grid",
    "train_transform",
]

# The knobs and their preset values live in config.py (no torch import: the CLI stays fast).


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


# The names weights use for their resize filter (torchvision's InterpolationMode values).
INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    m.value: m
    for m in (
        v2.InterpolationMode.NEAREST,
        v2.InterpolationMode.NEAREST_EXACT,
        v2.InterpolationMode.BILINEAR,
        v2.InterpolationMode.BICUBIC,
        v2.InterpolationMode.BOX,
        v2.InterpolationMode.HAMMING,
        v2.InterpolationMode.LANCZOS,
    )
}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """The torchvision mode for a filter name as weights and ``config.json`` store it."""
    mode = INTERPOLATIONS.get(str(name).lower())
    if mode is None:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {name!r}")
    return mode


def eval_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
) -> Callable[[Tensor], Tensor]:
    """The deterministic evaluation preprocessing: centre crop and normalise, after resizing
    the shorter side to ``resize_size`` with ``interpolation`` when given (the weights' recipe;
    torchvision's ``ImageClassification`` does the same). Without ``resize_size`` the input is
    taken as already decoded at :func:`base_size_for` (runs from before resize_size existed).
    The same steps as :class:`EvalTransform`, which predict runs without torchvision."""
    same = EvalTransform(img_size, mean, std, resize_size=resize_size, interpolation=interpolation)
    return same.torchvision_pipeline()


def train_transform(
    cfg: AugmentConfig, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    c = cfg.resolved(img_size)
    if c.preset == "none":
        return eval_transform(img_size, mean, std)
    t: list[Callable] = []
    if c.crop_scale != (1.0, 1.0):
        t.append(v2.RandomResizedCrop(img_size, scale=c.crop_scale, antialias=True))
    else:
        t.append(v2.CenterCrop(img_size))
    if c.hflip:
        t.append(v2.RandomHorizontalFlip(c.hflip))
    if c.vflip:
        t.append(v2.RandomVerticalFlip(c.vflip))
    if c.rotation or c.translate or c.zoom != (1.0, 1.0):
        t.append(
            v2.RandomAffine(
                degrees=c.rotation,
                translate=(c.translate, c.translate) if c.translate else None,
                scale=c.zoom if c.zoom != (1.0, 1.0) else None,
            )
        )
    if c.color_jitter:
        j = c.color_jitter
        t.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if c.policy == "trivialaugment":
        t.append(v2.TrivialAugmentWide())
    elif c.policy == "randaugment":
        t.append(v2.RandAugment())
    elif c.policy != "none":
        raise ValueError(
            f"augmentation policy must be trivialaugment, randaugment or none, not {c.policy!r}"
        )
    t.extend(_normalize(mean, std))
    if c.erasing:
        t.append(v2.RandomErasing(c.erasing))
    return v2.Compose(t)


def batch_transform(cfg: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp / CutMix on a whole batch (labels become soft), or ``None`` when both are off."""
    c = cfg.resolved()
    options = []
    if c.mixup:
        options.append(v2.MixUp(alpha=c.mixup, num_classes=num_classes))
    if c.cutmix:
        options.append(v2.CutMix(alpha=c.cutmix, num_classes=num_classes))
    if not options:
        return None
    return options[0] if len(options) == 1 else v2.RandomChoice(options)


def preview_grid(
    images: list[Tensor],
    cfg: AugmentConfig,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    views: int = 6,
    seed: int = 0,
) -> Tensor:
    """A grid (uint8, 3 x H x W): each row one image, its first column the eval view, then
    ``views`` augmented views."""
    from torchvision.utils import make_grid

    torch.manual_seed(seed)
    ev = eval_transform(img_size, mean, std)
    tr = train_transform(cfg, img_size, mean, std)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    tiles = []
    for img in images:
        tiles.append(ev(img))
        tiles.extend(tr(img) for _ in range(views))
    grid = make_grid([(t * s + m).clamp(0, 1) for t in tiles], nrow=views + 1, padding=2)
    return (grid * 255).round().to(torch.uint8)

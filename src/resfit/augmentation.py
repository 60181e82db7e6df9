"""Augmentation presets (torchvision.transforms.v2) and the deterministic eval preprocessing.

Every transform takes a uint8 (3, H, W) tensor whose shorter side is ``base_size`` (see
:func:`base_size_for`) and returns a normalised float tensor of ``img_size`` x ``img_size``.

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
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor
from torchvision.transforms import v2

PRESETS = ("none", "light", "standard", "strong")


@dataclass
class AugmentConfig:
    """The knobs behind the presets; ``None`` means "the preset's value"."""

    preset: str = "standard"
    hflip: float | None = None  # probability
    vflip: float | None = None  # probability (off by default: not for natural photos)
    crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range
    rotation: float | None = None  # degrees, +/-
    translate: float | None = None  # fraction of the size
    zoom: tuple[float, float] | None = None  # scale range of the affine
    color_jitter: float | None = None  # brightness/contrast/saturation strength
    policy: str | None = None  # "trivialaugment" | "randaugment" | "none"
    erasing: float | None = None  # probability
    mixup: float | None = None  # alpha, 0 = off
    cutmix: float | None = None  # alpha, 0 = off

    def resolved(self) -> AugmentConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"--augment must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        base = _PRESET_VALUES[self.preset]
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in base.items():
            if values[k] is None:
                values[k] = v
        return AugmentConfig(**values)

    def to_dict(self) -> dict:
        return asdict(self.resolved())


_OFF = dict(
    hflip=0.0,
    vflip=0.0,
    crop_scale=(1.0, 1.0),
    rotation=0.0,
    translate=0.0,
    zoom=(1.0, 1.0),
    color_jitter=0.0,
    policy="none",
    erasing=0.0,
    mixup=0.0,
    cutmix=0.0,
)
_PRESET_VALUES: dict[str, dict] = {
    "none": _OFF,
    "light": {**_OFF, "hflip": 0.5, "crop_scale": (0.35, 1.0)},
    "standard": {
        **_OFF,
        "hflip": 0.5,
        "crop_scale": (0.35, 1.0),
        "rotation": 15.0,
        "translate": 0.1,
        "zoom": (0.9, 1.1),
        "color_jitter": 0.2,
    },
    "strong": {
        **_OFF,
        "hflip": 0.5,
        "crop_scale": (0.25, 1.0),
        "policy": "trivialaugment",
        "erasing": 0.25,
        "mixup": 0.2,
        "cutmix": 1.0,
    },
}


def base_size_for(img_size: int) -> int:
    """Shorter side images are stored at: the 256-for-224 ratio of ImageNet evaluation, and
    the image size itself for small inputs (CIFAR's 32 px are used whole)."""
    return img_size if img_size <= 64 else round(img_size / 0.875)


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    return v2.Compose([v2.CenterCrop(img_size), *_normalize(mean, std)])


def train_transform(
    cfg: AugmentConfig, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> v2.Compose:
    c = cfg.resolved()
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


def for_channels(
    transform: Callable[[Tensor], Tensor], in_chans: int
) -> Callable[[Tensor], Tensor]:
    """Adapt an RGB transform to a model with ``in_chans`` input channels: images always
    decode as RGB, and a 1-channel model sees their luminance (ITU-R 601 weights)."""
    if in_chans == 3:
        return transform
    if in_chans != 1:
        raise ValueError(f"images are RGB; a model with in_chans={in_chans} needs its own loader")

    def luminance(img: Tensor) -> Tensor:
        grey = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        return transform(grey.round().clamp(0, 255).to(torch.uint8)[None])

    return luminance


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

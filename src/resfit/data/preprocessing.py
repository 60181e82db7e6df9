"""The deterministic evaluation preprocessing, in torch alone: what predict, eval and serve run.

:class:`EvalPreprocessing` says how a run's images reach its model (decode size, resize filter,
centre crop, normalisation, input channels); its :meth:`~EvalPreprocessing.eval_transform` is
:class:`EvalTransform`, which gives exactly (bit for bit) what torchvision's
``Resize``/``CenterCrop``/``ToDtype``/``Normalize`` give, with the same arithmetic in the same
order, without importing torchvision. Importing torchvision costs 0.9-1.3 s (its ``ops``
import ``torch._dynamo``), more than half of ``resfit predict``'s start before any image is
read. The one case it does not do itself, a real resize (an image whose shorter side is not
the decode size) or a crop larger than the image, goes to torchvision's own transform,
imported then: images decoded by resfit already have the decode size, so predict never does.

Imports only torch and the error types; :mod:`resfit.data.augmentation` (training's transforms,
torchvision) builds on it and re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError
from ..core.windows import Window, parse_window

__all__ = [
    "INTERPOLATION_NAMES",
    "EvalPreprocessing",
    "EvalTransform",
    "base_size_for",
    "check_interpolation",
    "decode_size",
    "for_channels",
]

# torchvision's InterpolationMode values: the names weights and config.json use for a filter.
INTERPOLATION_NAMES = (
    "nearest",
    "nearest-exact",
    "bilinear",
    "bicubic",
    "box",
    "hamming",
    "lanczos",
)


def check_interpolation(name: str) -> str:
    """``name`` as a known filter name (lower case); a :class:`ConfigError` otherwise."""
    lowered = str(name).lower()
    if lowered not in INTERPOLATION_NAMES:
        raise ConfigError(
            f"interpolation must be one of {', '.join(INTERPOLATION_NAMES)}, not {name!r}"
        )
    return lowered


def base_size_for(img_size: int) -> int:
    """Shorter side images are stored at: the 256-for-224 ratio of ImageNet evaluation, and
    the image size itself for small inputs (CIFAR's 32 px are used whole)."""
    return img_size if img_size <= 64 else round(img_size / 0.875)


def decode_size(img_size: int, resize_size: int | None = None) -> int:
    """Shorter side that evaluation images are decoded (and kept in memory) at: the weights'
    ``resize_size`` when they state one, else :func:`base_size_for`. Decoding straight to it
    makes the resize in the eval transform a no-op for bilinear weights."""
    if resize_size is None:
        return base_size_for(img_size)
    if resize_size < img_size:
        raise ConfigError(
            f"resize_size {resize_size} is smaller than the {img_size} px crop it feeds"
        )
    return int(resize_size)


def _resized(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The size torchvision's ``Resize(shorter)`` gives an image (its own arithmetic)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class EvalTransform:
    """uint8 (C, H, W) image -> normalised float32 (C, img_size, img_size), equal bit for bit
    to torchvision's eval pipeline (:func:`resfit.data.augmentation.eval_transform`) for the same
    arguments. A windowed float32 image in [0, 1] (DICOM, 16-bit with ``--window``) takes the
    same steps without the division by 255. Thread-safe: decode threads call it on their own
    images."""

    def __init__(
        self,
        img_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        self.resize_size, self.interpolation = resize_size, check_interpolation(interpolation)
        self.shorter = decode_size(img_size, resize_size) if resize_size is not None else None
        # As torchvision's normalize builds them: float32, shape (C, 1, 1).
        self._mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._fallback: Callable[[Tensor], Tensor] | None = None

    def torchvision_pipeline(self) -> Callable[[Tensor], Tensor]:
        """torchvision's own pipeline for the same arguments (imported on first use): what
        :meth:`__call__` leaves to it, and :func:`resfit.data.augmentation.eval_transform`."""
        if self._fallback is None:
            from torchvision.transforms import v2

            steps: list[Callable] = []
            if self.shorter is not None:
                mode = v2.InterpolationMode(self.interpolation)
                steps.append(v2.Resize(self.shorter, mode, antialias=True))
            self._fallback = v2.Compose([
                *steps, v2.CenterCrop(self.img_size), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ])  # fmt: skip
        return self._fallback

    def __call__(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        size = self.img_size
        resize = self.shorter is not None and _resized(h, w, self.shorter) != (h, w)
        known = image.dtype in (torch.uint8, torch.float32)
        if resize or not known or size > h or size > w or image.numel() == 0:
            return self.torchvision_pipeline()(image)
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        crop = image[..., top : top + size, left : left + size]
        if image.dtype == torch.float32:  # already in [0, 1] (ToDtype leaves floats alone)
            return crop.sub(self._mean).div_(self._std)  # sub: a new tensor, the image intact
        # ToDtype(float32, scale=True), then Normalize: the same operations, in this order.
        x = crop.to(torch.float32).mul_(1.0 / 255)
        return x.sub(self._mean).div_(self._std)


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
        if img.is_floating_point():  # a windowed image: its grey at full precision
            return transform(grey.clamp(0, 1)[None])
        return transform(grey.round().clamp(0, 255).to(torch.uint8)[None])

    return luminance


@dataclass(frozen=True)
class EvalPreprocessing:
    """How a run's images reach its model at evaluation and inference: decode size, resize
    filter, crop, normalisation and input channels.

    Read from a run's flat ``config.json`` with :meth:`from_config`; ``resize_size`` and
    ``interpolation`` are optional there (runs written before they existed decode at
    :func:`base_size_for` with bilinear, as they were validated). Training's counterpart is
    the ``pre`` section of :class:`resfit.core.config.TrainConfig`, which writes these keys.
    """

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    resize_size: int | None = None
    interpolation: str = "bilinear"
    window: str | None = None  # --window of DICOM and 16-bit images (None: a DICOM file's own)

    def __post_init__(self) -> None:
        check_interpolation(self.interpolation)  # refuse an unknown filter now, not per image
        decode_size(self.img_size, self.resize_size)
        parse_window(self.window)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EvalPreprocessing:
        resize = cfg.get("resize_size")
        return cls(
            img_size=int(cfg["img_size"]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            in_chans=int(cfg.get("in_chans") or 3),
            resize_size=int(resize) if resize is not None else None,
            interpolation=str(cfg.get("interpolation") or "bilinear"),
            window=cfg.get("window") or None,
        )

    @property
    def decode_size(self) -> int:
        return decode_size(self.img_size, self.resize_size)

    @property
    def window_values(self) -> Window:
        """The window as (level, width), what the decoding functions take."""
        return parse_window(self.window)

    def eval_transform(self) -> Callable[[Tensor], Tensor]:
        """:class:`EvalTransform` for this run, adapted to its input channels."""
        tf = EvalTransform(
            self.img_size,
            self.mean,
            self.std,
            resize_size=self.resize_size,
            interpolation=self.interpolation,
        )
        return for_channels(tf, self.in_chans)

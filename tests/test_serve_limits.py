"""resfit serve under bad requests (issue 26): the decoding budget, request limits, JSON for any
class name, errors counted in /metrics, strict query parsing, and ``--workers`` signals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _old_pil_to_rgb(img: Image.Image) -> Image.Image:
    """The conversion before issue 26 (float64 and whole-image RGBA copies): the reference."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        peak = 65535 if arr.max() > 255 else 255
        return Image.fromarray(
            (arr.astype(np.float64) * (255 / peak)).round().astype(np.uint8)
        ).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo or 1.0) * 255
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = (37, 53)
    full16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    low16 = rng.integers(0, 256, shape, dtype=np.uint16)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    palette = Image.fromarray(rgba[..., 0] // 16).convert("P")
    palette.info["transparency"] = 3
    every16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    return [
        Image.fromarray(full16),  # I;16
        Image.fromarray(low16),
        Image.fromarray(every16),
        Image.fromarray(full16.astype(np.int32)),  # mode I, as 16-bit PNGs often open
        Image.fromarray(rng.normal(0, 3, shape).astype(np.float32)),  # F
        Image.fromarray(rgba),  # RGBA
        Image.fromarray(rgba).convert("LA"),
        Image.fromarray(rgba).convert("PA"),
        palette,
        Image.fromarray(rgba[..., :3]),  # RGB: unchanged path
    ]


@pytest.mark.parametrize("strip", [1 << 20, 100])  # one strip, and many strips of two rows
def test_strip_conversion_is_bit_identical_to_the_whole_image_one(monkeypatch, strip) -> None:
    from resfit.data import decode

    monkeypatch.setattr(decode, "_STRIP_PIXELS", strip)
    for img in _odd_images():
        new, old = decode.pil_to_rgb(img), _old_pil_to_rgb(img)
        assert new.mode == "RGB" and new.size == old.size, img.mode
        assert np.array_equal(np.asarray(new), np.asarray(old)), img.mode

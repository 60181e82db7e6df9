"""Decoding an image file the way a person sees it: EXIF orientation applied, grey/palette/CMYK
converted, 16-bit scaled (not clipped), transparency composited on white, the first frame of a
GIF; a file that cannot be decoded raises :class:`DecodeError`, which callers turn into a skip
with its reason, never a crash.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = ["DecodeError", "load_image", "pil_to_rgb", "resize_shorter", "to_tensor"]
# PIL's own decompression-bomb limit; a larger image is refused before it is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


# ---------------------------------------------------------------------------------------------
# Decoding


class DecodeError(Exception):
    pass


def pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        # 16-bit data: scale to 8 bits instead of letting convert() clip it to white.
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


def load_image(
    path: str | os.PathLike, max_side: int | None = None, data: bytes | None = None
) -> Image.Image:
    """Decode one image to RGB as a person sees it. ``max_side`` lets JPEG decoding downscale
    in the DCT domain (PIL's draft mode), several times faster for large photos. ``data``: the
    file's bytes, already read (``path`` then only names it).

    Raises :class:`DecodeError` with a short reason for anything unreadable.
    """
    path = Path(path)
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise DecodeError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DecodeError(
                        f"{img.width}x{img.height} pixels exceeds the {MAX_PIXELS:,} limit "
                        f"(decompression bomb guard)"
                    )
                if max_side and img.format == "JPEG":
                    img.draft("RGB", (max_side, max_side))
                img.seek(0)  # first frame of an animation
                img = ImageOps.exif_transpose(img)
                img.load()
                return pil_to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb guard: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(reason) from None


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

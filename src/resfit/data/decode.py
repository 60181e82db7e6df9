"""Decoding an image file the way a person sees it: EXIF orientation applied, grey/palette/CMYK
converted, 16-bit scaled (not clipped), transparency composited on white, the first frame of a
GIF; a file that cannot be decoded raises :class:`DecodeError`, which callers turn into a skip
with its reason, never a crash.

Windowed images (DICOM grey, and 16-bit PNG/TIFF with a chosen ``window``) decode to a PIL
``F`` image (float32 grey in [0, 1]) instead of RGB: :func:`resize_shorter` keeps it float and
:func:`to_tensor` gives a float32 (3, H, W) tensor in [0, 1] (one plane seen three times, so it
takes 4 bytes a pixel, not 12), which the eval and training transforms take as it is. Ordinary
photos keep their uint8 path untouched.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..core.windows import Window
from .dicom import is_dicom, read_dicom, to_uint8, window_array

__all__ = [
    "DecodeError",
    "displayable",
    "load_image",
    "pil_to_rgb",
    "resize_shorter",
    "to_tensor",
]
# PIL's own decompression-bomb limit; a larger image is refused before it is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


# ---------------------------------------------------------------------------------------------
# Decoding


class DecodeError(Exception):
    pass


# Rows converted at a time: the extra memory of a conversion is one strip, never a full copy.
_STRIP_PIXELS = 1 << 20


def _strips(img: Image.Image) -> Iterator[tuple[int, int]]:
    rows = max(1, _STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        yield top, min(img.height, top + rows)


def _scaled_to_l(img: Image.Image, scale: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """A one-band image converted strip by strip to 8-bit grey with ``scale``."""
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top, bottom in _strips(img):
        out[top:bottom] = scale(np.asarray(img.crop((0, top, img.width, bottom))))
    return Image.fromarray(out)


def _windowed(img: Image.Image, window: tuple[float, float]) -> Image.Image:
    """A one-band image through ``window``, strip by strip, as a float32 ``F`` image."""
    out = np.empty((img.height, img.width), dtype=np.float32)
    for top, bottom in _strips(img):
        out[top:bottom] = window_array(np.asarray(img.crop((0, top, img.width, bottom))), window)
    return Image.fromarray(out)  # float32: mode F


def _sixteen_bit_to_rgb(img: Image.Image, window: Window = None) -> Image.Image:
    if window is not None:  # --window: the chosen window of the raw values, at full precision
        return _windowed(img, window)
    # 16-bit data: scale to 8 bits instead of letting convert() clip it to white. In integers:
    # round(x * 255 / 65535) = round(x / 257) = (x + 128) // 257 (x / 257 is never a half).
    peak = 65535 if img.getextrema()[1] > 255 else 255

    def scale(a: np.ndarray) -> np.ndarray:
        a = np.clip(a, 0, peak).astype(np.uint32)  # mode I: int32, clipped to the 16-bit range
        return ((a + 128) // 257 if peak == 65535 else a).astype(np.uint8)

    return _scaled_to_l(img, scale).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    lo, hi = (float(v) for v in img.getextrema())
    span = hi - lo or 1.0

    def scale(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float64) - lo) / span * 255).round().astype(np.uint8)

    return _scaled_to_l(img, scale)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparency over white, strip by strip (PIL's alpha_composite, so the same pixels)."""
    out = Image.new("RGB", img.size)
    for top, bottom in _strips(img):
        rgba = img.crop((0, top, img.width, bottom)).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, rgba).convert("RGB"), (0, top))
    return out


def pil_to_rgb(img: Image.Image, window: Window = None) -> Image.Image:
    """Any PIL mode as RGB. 16-bit, float and transparent images are converted in strips of
    rows: the extra memory is a strip, not float64 or RGBA copies of the whole image. With a
    ``window``, a 16-bit image comes back as a float ``F`` image in [0, 1] (see the module)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _sixteen_bit_to_rgb(img, window)
    if img.mode == "F":
        return _float_to_rgb(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike,
    max_side: int | None = None,
    data: bytes | None = None,
    *,
    window: Window = None,
) -> Image.Image:
    """Decode one image to RGB as a person sees it. ``max_side`` lets JPEG decoding downscale
    in the DCT domain (PIL's draft mode), several times faster for large photos. ``data``: the
    file's bytes, already read (``path`` then only names it). ``window`` (level, width): the
    intensity window of DICOM and 16-bit images (None: a DICOM file's own); those come back as
    float ``F`` images in [0, 1] (the module's doc).

    Raises :class:`DecodeError` with a short reason for anything unreadable.
    """
    path = Path(path)
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise DecodeError("empty file")
        if is_dicom(path, data):
            return _load_dicom(path, data, window)
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
                return pil_to_rgb(img, window)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb guard: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(reason) from None


def _load_dicom(path: Path, data: bytes | None, window: Window) -> Image.Image:
    """A DICOM file as a float ``F`` image (grey) or RGB (colour; see :mod:`resfit.data.dicom`);
    a missing pydicom is a reason to skip it that says what to install."""
    try:
        pixels = read_dicom(path, data, MAX_PIXELS, window=window)
    except ImportError as e:
        raise DecodeError(str(e)) from None
    if pixels.ndim == 2:
        return Image.fromarray(pixels)  # float32: mode F
    return Image.fromarray(pixels).convert("RGB")


def displayable(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB for a person or a JPEG (a windowed float image rounded to 8 bits);
    never on the way to the model."""
    if img.mode == "F":
        return Image.fromarray(to_uint8(np.asarray(img, dtype=np.float32))).convert("RGB")
    return img


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> uint8 tensor (3, H, W); a windowed ``F`` image -> float32 (3, H, W) in
    [0, 1], its one plane expanded (a view: the three channels share memory)."""
    if img.mode == "F":
        plane = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
        return plane[None].expand(3, -1, -1)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

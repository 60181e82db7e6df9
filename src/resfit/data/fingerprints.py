"""Image fingerprints: the sha256 of a file and a 64-bit perceptual hash (pHash: the signs of
the 8x8 lowest 2-D DCT frequencies of a 32x32 grey thumbnail) that survives re-encoding,
resizing and small changes of brightness. Leakage checks and shard indexes compare them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .paths import display_path

if TYPE_CHECKING:  # the embedding signal is opt-in; torch is imported only when it is used
    pass

log = logging.getLogger("resfit")

__all__ = ["ImageHash", "fingerprint", "hamming", "hash_image", "hash_images", "phash"]
_HASH_SIZE = 32  # the grey thumbnail the DCT runs on
_LOW = 8  # keep the LOW x LOW lowest frequencies: 64 bits


@dataclass(frozen=True)
class ImageHash:
    """The two fingerprints of one file; ``phash`` is None when the file does not decode."""

    path: Path
    sha256: str
    phash: int | None


def _dct_matrix(n: int) -> np.ndarray:
    # Orthonormal DCT-II basis: row k is cos(pi * (2i + 1) * k / 2n), scaled.
    i = np.arange(n)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(n)[:, None] / (2 * n))
    m[0] *= 1 / np.sqrt(2)
    return m * np.sqrt(2 / n)


_DCT = _dct_matrix(_HASH_SIZE)
_BIT_WEIGHTS = (1 << np.arange(_LOW * _LOW - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash of an (already oriented) image."""
    grey = image.convert("L").resize((_HASH_SIZE, _HASH_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_LOW, :_LOW].reshape(-1)
    # The DC term only says how bright the picture is: leave it out of the median so a
    # brightened copy keeps the same bits.
    bits = low > np.median(low[1:])
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _open_small(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    # JPEG only: decode straight to grey at 1/2..1/8 scale, still >= 64 px a side.
    im.draft("L", (2 * _HASH_SIZE, 2 * _HASH_SIZE))
    im.load()
    # The picture as people see it: a copy that differs only in its EXIF orientation tag (and
    # the correspondingly rotated pixels) is the same picture.
    return ImageOps.exif_transpose(im)


def fingerprint(data: bytes) -> int | None:
    """The perceptual hash of an image file's bytes, or None where they do not decode (as
    :func:`hash_image` computes it; ``resfit prepare`` keeps it in the shard index)."""
    try:
        return phash(_open_small(data))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def hash_image(path: str | os.PathLike) -> ImageHash:
    """Fingerprint one file. Raises OSError when it cannot be read at all."""
    path = Path(path)
    data = path.read_bytes()
    ph = fingerprint(data)
    if ph is None:
        log.warning("cannot decode %s: only exact copies of it will be found", display_path(path))
    return ImageHash(path, hashlib.sha256(data).hexdigest(), ph)


def _safe_hash(path: Path) -> ImageHash | None:
    try:
        return hash_image(path)
    except OSError as e:
        log.warning("cannot read %s (%s): left out of the duplicate scan", display_path(path), e)
        return None


def hash_images(paths: Iterable[str | os.PathLike], workers: int | None = None) -> list[ImageHash]:
    """Fingerprint many files in parallel, in order; unreadable files are left out (logged)."""
    paths = [Path(p) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 32:
        results = [_safe_hash(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_safe_hash, paths, chunksize=16))
    return [r for r in results if r is not None]

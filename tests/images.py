"""Make small image folders in tests: learnable colour classes, odd formats and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def colour_image(
    rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 24
) -> Image.Image:
    base = np.array(rgb, dtype=np.float64)[None, None, :]
    noise = rng.normal(0, 30, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_colour_folder(
    root: Path,
    per_class: int = 20,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
    size: int = 24,
) -> Path:
    """root/<split>/<colour>/*.png: three classes a small network learns in an epoch or two."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for name, rgb in COLOURS.items():
            folder = (root / split / name) if split else (root / name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour_image(rgb, rng, size).save(folder / f"{i:03d}.png")
    return root


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_broken_files(folder: Path) -> list[Path]:
    """Zero-byte, truncated, non-image and decompression-bomb files, as users' folders have."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    good = jpeg_bytes(colour_image((200, 40, 40), rng, 64))
    files = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 3],
        "notes.png": b"these are my notes, not an image\n" * 20,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    bomb = folder / "bomb.png"
    # A tiny file that claims a 20,000 x 20,000 image: 400 M pixels, over PIL's bomb limit.
    Image.new("1", (20_000, 20_000)).save(bomb, optimize=True)
    return [folder / n for n in files] + [bomb]

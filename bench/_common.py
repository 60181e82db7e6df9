"""Shared benchmark helpers: where the shared assets are, and real flowers5 input.

The timer, the GEMM roof and the machine summary live in :mod:`resfit.apps.benchmark` (``resfit
bench`` uses them too)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from resfit.apps.benchmark.common import machine_summary  # noqa: F401  (bench/finetune.py imports it here)
from resfit.models.weights import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
FLOWERS_ZIP = ASSETS / "datasets" / "flowers5-256.zip"


def flowers_batch(n: int, size: int = 224) -> np.ndarray | None:
    """``n`` real photos from flowers5 val, resized + centre-cropped to ``size``, normalised
    with the ImageNet statistics; None where the shared assets are absent."""
    if not FLOWERS_ZIP.exists():
        return None
    from PIL import Image

    images = []
    with zipfile.ZipFile(FLOWERS_ZIP) as z:
        names = sorted(x for x in z.namelist() if x.startswith("val/") and x.endswith(".jpg"))
        # Spread over the (alphabetical) classes rather than taking the first n daisies.
        for name in names[:: max(1, len(names) // n)][:n]:
            with z.open(name) as f:
                img = Image.open(f).convert("RGB")
            scale = size / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)))
            left, top = (img.width - size) // 2, (img.height - size) // 2
            images.append(np.asarray(img.crop((left, top, left + size, top + size))))
    x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std

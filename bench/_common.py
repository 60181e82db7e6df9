"""Shared benchmark helpers: a median-of-N timer, the machine's GEMM roof, a machine summary."""

from __future__ import annotations

import platform
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
FLOWERS_ZIP = ASSETS / "datasets" / "flowers5-256.zip"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median (what we report), the best, and every sample."""

    median: float
    best: float
    samples: tuple[float, ...]


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    The median, not the mean: on a shared machine one slow outlier should not move the figure.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), tuple(samples))


def gemm_roof(n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of an n x n x n matmul in fp32, bf16 and int8 on this machine.

    The practical ceiling a convolution network can approach per precision; int8 uses
    ``torch._int_mm`` (oneDNN, VNNI where present) and is NaN where that is unavailable. The
    best run, not the median: a roof is what the machine can do, and other jobs only lower it.
    """
    flops = 2 * n**3
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[name] = flops / median_time(lambda a=a, b=b: a @ b, repeats).best / 1e9
    try:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
        out["int8"] = flops / median_time(lambda: torch._int_mm(a, b), repeats).best / 1e9
    except (RuntimeError, AttributeError):
        out["int8"] = float("nan")
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    from resfit.runtime import cpu_flags

    isa = [
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in cpu_flags()
    ]
    return (
        f"{cpu_name()}, {torch.get_num_threads()} threads, ISA {'/'.join(isa) or '?'}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


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

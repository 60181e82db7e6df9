"""Device and numeric precision: what runs fastest and still right on the machine at hand.

Measured on the project's 2-core Xeon (AVX-512 with VNNI but *without* AVX512_BF16 or AMX):
a bf16 GEMM runs at 59 GFLOP/s against 261 for fp32, and ResNet-50 with bf16 autocast is
2.3x slower than fp32. So ``auto`` picks bf16 on a CPU only where the CPU has native bf16
(AVX512_BF16 or AMX), and fp32 elsewhere; on CUDA it picks bf16 (Ampere and newer) or fp16.
int8 is not a PyTorch path here: it is the ONNX Runtime engine of :mod:`resfit.export`.

:mod:`resfit.inference.folding`'s ``prepare_for_inference`` turns a model into the fastest correct callable for a device: a
copy in eval mode with every BatchNorm folded into the convolution before it, channels-last
memory (oneDNN's native layout for convolutions on CPU, tensor cores' on GPU), autocast for
bf16/fp16 and, on request, ``torch.compile``. ``bench/inference.py`` measures each step: on
ResNet-50 (2 threads, batch 32) folding + channels-last ran 1.15-1.30x torchvision eager here
and 1.6x on an AMX Xeon, where channels-last alone gave 1.0-1.4x; compile added a little more
for a minute of compiling. ONNX Runtime (1.75x fp32, 4-5x int8) is faster still on CPUs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = [
    "PRECISIONS",
    "autocast",
    "cpu_has_native_bf16",
    "describe",
    "pick_device",
    "pick_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: the only CPUs on which bf16 beats fp32 (measured, see module doc)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return dev


def pick_precision(device: torch.device, precision: str = "auto") -> str:
    """Resolve ``auto`` to fp32/bf16/fp16 for ``device``; check an explicit choice."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for bf16/fp16, a no-op for fp32 (and int8, which is an ONNX engine)."""
    if precision in _DTYPES:
        with torch.autocast(device.type, dtype=_DTYPES[precision]):
            yield
    else:
        yield


def describe(device: torch.device, precision: str) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({precision})"
    return f"CPU x{torch.get_num_threads()} threads ({precision})"

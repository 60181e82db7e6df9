"""Device and numeric precision: what runs fastest and still right on the machine at hand.

Measured on the project's 2-core Xeon (AVX-512 with VNNI but *without* AVX512_BF16 or AMX):
a bf16 GEMM runs at 59 GFLOP/s against 261 for fp32, and ResNet-50 with bf16 autocast is
2.3x slower than fp32. So ``auto`` picks bf16 on a CPU only where the CPU has native bf16
(AVX512_BF16 or AMX), and fp32 elsewhere; on CUDA it picks bf16 (Ampere and newer) or fp16.
int8 is not a PyTorch path here: it is the ONNX Runtime engine of :mod:`resfit.export`.

``prepare_for_inference`` turns a model into the fastest correct callable for a device: a
copy in eval mode with every BatchNorm folded into the convolution before it, channels-last
memory (oneDNN's native layout for convolutions on CPU, tensor cores' on GPU), autocast for
bf16/fp16 and, on request, ``torch.compile``. ``bench/inference.py`` measures each step: on
ResNet-50 (2 threads, batch 32) folding + channels-last ran 1.15-1.30x torchvision eager here
and 1.6x on an AMX Xeon, where channels-last alone gave 1.0-1.4x; compile added a little more
for a minute of compiling. ONNX Runtime (1.75x fp32, 4-5x int8) is faster still on CPUs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import adapt, has_adapter
from .errors import ConfigError

log = logging.getLogger("resfit")

__all__ = [
    "PRECISIONS",
    "InferenceModel",
    "autocast",
    "cpu_has_native_bf16",
    "describe",
    "fold_conv_bn",
    "pick_device",
    "pick_precision",
    "prepare_for_inference",
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


# ---------------------------------------------------------------------------------------------
# Inference fast path


def _fold_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv, bn)`` attributes whose forward computes exactly ``bn(conv(x))``.

    Only layouts known to chain conv -> BN directly are folded: ``nn.Sequential`` in any model
    (a Conv2d followed by a BatchNorm2d), and the pairs the model's adapter vouches for
    (resfit's and torchvision's ResNets: ``convN`` feeds ``bnN``). An unknown module may use
    its BN on something else, so it is left alone; so is BN without running statistics.
    """
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            names = [n for n, _ in parent.named_children()]
            pairs += [(parent, a, b) for a, b in zip(names, names[1:], strict=False)]
    if has_adapter(model):
        pairs += adapt(model).conv_bn_pairs()
    unique = {(id(p), c, b): (p, c, b) for p, c, b in pairs}
    return [
        (parent, c, b)
        for parent, c, b in unique.values()
        if isinstance(getattr(parent, c, None), nn.Conv2d)
        and isinstance(getattr(parent, b, None), nn.BatchNorm2d)
        and getattr(parent, b).track_running_stats
    ]


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the preceding conv.

    In eval mode BN is a per-channel affine map, so it merges into the conv's weight and bias:
    one fewer pass over every activation. ``model`` itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    for parent, conv_name, bn_name in _fold_pairs(folded):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())
    return folded


class InferenceModel:
    """A prepared model: call it on an NCHW float batch (any device), get fp32 logits.

    ``module`` is the (folded) copy that runs; ``precision`` is resolved (never ``auto``).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        precision: str,
        *,
        folded: bool,
        compiled: bool,
    ) -> None:
        self.module = module
        self.device = device
        self.precision = precision
        self.folded = folded
        self.compiled = compiled
        # Not inductor's "freezing" option: interleaved on a 2-core Zen 4 (bf16, ResNet-50) it
        # changed nothing (batch 32: 36.8 vs 37.4 images/s; batch 1: 43.1 vs 40.5 ms).
        self._fn: Callable[[Tensor], Tensor] = torch.compile(module) if compiled else module

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            try:
                out = self._fn(x)
            except Exception as e:
                if not self.compiled:
                    raise
                # torch.compile needs a working C++ toolchain; a laptop may lack one. Eager
                # is the same computation, only slower, so fall back rather than fail.
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"running eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled, self._fn = False, self.module
                out = self._fn(x)
        return out.float()

    def __repr__(self) -> str:
        return (
            f"InferenceModel({type(self.module).__name__}, {describe(self.device, self.precision)}, "
            f"folded={self.folded}, compiled={self.compiled})"
        )


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device | None = "auto",
    precision: str = "auto",
    compile: bool = False,
    *,
    fold_bn: bool = True,
) -> InferenceModel:
    """The fastest correct eager (or compiled) callable for ``model`` on ``device``.

    Works on a copy (``model`` keeps its weights, device and train/eval mode): eval mode,
    conv+BN folding (``fold_bn``), channels-last weights and inputs, autocast for bf16/fp16,
    and ``torch.compile`` when ``compile`` (its first call compiles, which takes a while).
    ``precision="auto"`` follows :func:`pick_precision`. int8 is served by the ONNX engine
    (:func:`resfit.export.quantize_int8`), not here.
    """
    dev = pick_device(device)
    prec = pick_precision(dev, precision)
    if prec == "int8":
        raise ConfigError(
            "int8 runs on ONNX Runtime, not PyTorch: export with resfit.export.export_onnx, "
            "quantize with quantize_int8 and run OnnxClassifier (or `resfit predict --engine onnx`)"
        )
    module = fold_conv_bn(model) if fold_bn else copy.deepcopy(model).eval()
    # Weights stay fp32 under autocast: it casts per op, and keeps accuracy-sensitive ops fp32.
    module = module.to(dev, memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    return InferenceModel(module, dev, prec, folded=fold_bn, compiled=compile)

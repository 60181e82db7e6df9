"""Benchmarks a user can run on their own machine (``resfit bench``), against the baseline.

Three measurements, each against what users write without resfit, in the same process and on
the same input, and each against this machine's GEMM roof measured in the same run:

- :func:`bench_inference`: batch throughput and batch-1 latency of torchvision eager fp32
  (the baseline) and resfit's engines (BN folded + channels-last, bf16 autocast,
  ``torch.compile``, ONNX Runtime fp32 and static int8, OpenVINO; on a GPU TensorRT fp32, fp16
  and int8), with each engine's top-1 agreement with the baseline on the input.
- :func:`bench_train_step`: one SGD step of the naive loop (torchvision model, fp32, NCHW)
  against :class:`~resfit.training.step.TrainStep`, the step ``train()`` runs (its optimizer
  groups, channels-last, autocast where it pays, optionally compiled), from the same weights
  on the same batch.
- :func:`bench_pipeline`: decode + augment images/s of torchvision's ImageFolder/DataLoader
  (decodes every JPEG every epoch) against resfit's decode-once images and per-epoch
  augmentation, set against the images/s the training step consumes.

Timings are medians of interleaved rounds: load from other jobs falls on every engine alike.
Slowness never raises; an engine that cannot run on this machine is reported and skipped.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...core import runtime
from ...data.augmentation import eval_transform
from ...data.datasets import decode_all
from ...data.discovery import discover
from ...data.preprocessing import base_size_for
from ...models.resnet import get_spec
from ...models.weights import IMAGENET_MEAN, IMAGENET_STD, create_model

# The architectures torchvision also builds: there the baseline is torchvision's own model.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# ---------------------------------------------------------------------------------------------
# Timing and the machine


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


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that waits for the GPU to finish, so that a timer measures the work itself."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def gemm_roof(
    n: int = 1024, repeats: int = 10, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of an n x n x n matmul in fp32, bf16 and int8 on ``device``.

    The practical ceiling a convolution network can approach per precision; int8 uses
    ``torch._int_mm`` (oneDNN, VNNI where present) and is NaN where that is unavailable. The
    best run, not the median: a roof is what the machine can do, and other jobs only lower it.
    """
    dev = torch.device(device)
    flops = 2 * n**3
    out: dict[str, float] = {}
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if dev.type == "cuda":
        dtypes.append(("fp16", torch.float16))
    for name, dtype in dtypes:
        a, b = (torch.randn(n, n, dtype=dtype, device=dev) for _ in range(2))
        out[name] = flops / median_time(synced(lambda a=a, b=b: a @ b, dev), repeats).best / 1e9
    try:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev) for _ in range(2))
        mm = synced(lambda: torch._int_mm(a, b), dev)
        out["int8"] = flops / median_time(mm, repeats).best / 1e9
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
    """CPU, threads, the ISA features that decide the precision, and library versions."""
    isa = [
        f
        for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
        if f in runtime.cpu_flags()
    ]
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu_name()}, {torch.get_num_threads()} threads, ISA {'/'.join(isa) or '?'}{gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def forward_gflop(model: nn.Module, shape: tuple[int, ...]) -> float:
    """GFLOP of one forward pass for one input of ``shape`` (C, H, W), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


@dataclass
class BenchRow:
    name: str
    precision: str
    images_per_s: float
    ratio: float = math.nan  # images/s over the baseline's
    roof_fraction: float = math.nan  # achieved GFLOP/s over the GEMM roof of its precision
    latency_ms: float = math.nan  # batch 1 (inference only)
    latency_ratio: float = math.nan  # this latency over the baseline's (lower is better)
    setup_s: float = math.nan  # export, quantization or compilation, paid once
    agreement: float = math.nan  # inference: top-1 agreement with the baseline on the input
    first_loss: float = math.nan  # training: loss of the first step (same weights, same batch)
    note: str = ""


@dataclass
class BenchReport:
    title: str
    machine: str
    roof: dict[str, float]
    rows: list[BenchRow] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        cols = [
            ("images/s", "images_per_s", "{:9.1f}"),
            ("x base", "ratio", "{:7.2f}"),
            ("% roof", "roof_fraction", "{:7.0%}"),
        ]
        extra = [
            ("b1 ms", "latency_ms", "{:8.1f}"),
            ("b1 / base", "latency_ratio", "{:10.2f}"),
            ("top-1 agree", "agreement", "{:12.1%}"),
            ("first loss", "first_loss", "{:11.4f}"),
            ("setup s", "setup_s", "{:8.1f}"),
        ]
        cols += [c for c in extra if any(_finite(getattr(r, c[1])) for r in self.rows)]
        width = max([len(r.name) for r in self.rows] + [10]) + 2
        roof = ", ".join(
            f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in self.roof.items()
        )
        lines = [self.title, f"machine: {self.machine}"]
        if roof:
            lines.append(f"GEMM roof (n=1024 matmul): {roof}")
        lines += [f"{k}: {v}" for k, v in self.info.items()]
        lines.append(f"{'':<{width}}" + "".join(f"{h:>{len(f.format(1.0))}}" for h, _, f in cols))
        for r in self.rows:
            cells = "".join(
                f.format(getattr(r, a)) if _finite(getattr(r, a)) else " " * len(f.format(1.0))
                for _, a, f in cols
            )
            lines.append(f"{r.name:<{width}}{cells}  {r.note}".rstrip())
        return "\n".join(lines)


def _finite(v: float) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn round after round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def baseline_and_ours(
    arch: str, weights: str | None, num_classes: int | None
) -> tuple[nn.Module, nn.Module]:
    """The baseline model (torchvision's where it has the architecture) and resfit's, with the
    same weights: seeded random ones unless ``weights`` names a checkpoint."""
    torch.manual_seed(0)
    ours = create_model(arch, weights=weights, num_classes=num_classes, progress=False)
    if arch in TORCHVISION_ARCHS:
        import torchvision

        base = getattr(torchvision.models, arch)(num_classes=ours.fc.out_features)
        base.load_state_dict(ours.state_dict())
    else:  # no torchvision twin (CIFAR nets): resfit's own module, run the plain eager way
        base = copy.deepcopy(ours)
    return base, ours


def bench_input_size(arch: str, model: nn.Module, img_size: int | None) -> int:
    default = get_spec(arch).default_input_size
    return img_size or int(model.pretrained_cfg.get("input_size", default))


def load_images(data: str | Path, n: int, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """``n`` preprocessed images (eval transform) from an image folder, spread over classes."""
    splits = discover(str(data))
    samples = splits.val or splits.train
    step = max(1, len(samples) // n)
    decoded = decode_all(samples[::step][:n], base_size_for(img_size), progress=False)
    tf = eval_transform(img_size, tuple(mean), tuple(std))
    return torch.stack([tf(im) for im in decoded.images])


class PeakMemory:
    """The peak memory of a process (this one by default) and its children (DataLoader
    workers), sampled every 50 ms while in the ``with`` block: ``rss``, the sum of the
    processes' resident sets (pages that forked workers share with the parent count once per
    process: an upper bound), and ``pss``, the sum of their proportional set sizes (a shared
    page counts as its share in each: what the tree takes from the machine)."""

    def __init__(self, pid: int | None = None) -> None:
        import threading

        self.pid, self.rss, self.pss = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(0.05):
            rss = pss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in tree:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

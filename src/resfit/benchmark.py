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
import importlib.util
import logging
import math
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import runtime
from .augmentation import base_size_for, eval_transform, train_transform
from .config import AugmentConfig, TrainConfig
from .data import TransformedImages, decode_all, discover, iter_batches
from .models import get_spec
from .tasks import SingleLabel
from .training.step import TrainStep, make_optimizer, param_groups
from .weights import IMAGENET_MEAN, IMAGENET_STD, create_model

log = logging.getLogger("resfit")

# The architectures torchvision also builds: there the baseline is torchvision's own model.
_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


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


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
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
        out[name] = flops / median_time(_synced(lambda a=a, b=b: a @ b, dev), repeats).best / 1e9
    try:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev) for _ in range(2))
        mm = _synced(lambda: torch._int_mm(a, b), dev)
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


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn round after round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _models(arch: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, nn.Module]:
    """The baseline model (torchvision's where it has the architecture) and resfit's, with the
    same weights: seeded random ones unless ``weights`` names a checkpoint."""
    torch.manual_seed(0)
    ours = create_model(arch, weights=weights, num_classes=num_classes, progress=False)
    if arch in _TORCHVISION:
        import torchvision

        base = getattr(torchvision.models, arch)(num_classes=ours.fc.out_features)
        base.load_state_dict(ours.state_dict())
    else:  # no torchvision twin (CIFAR nets): resfit's own module, run the plain eager way
        base = copy.deepcopy(ours)
    return base, ours


def _input_size(arch: str, model: nn.Module, img_size: int | None) -> int:
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


# ---------------------------------------------------------------------------------------------
# Inference


def bench_inference(
    arch: str = "resnet50",
    *,
    images: Tensor | None = None,
    data: str | Path | None = None,
    weights: str | None = None,
    batch: int = 32,
    img_size: int | None = None,
    repeats: int = 5,
    compile: bool = True,
    onnx: bool = True,
    bf16: bool = True,
    device: str = "auto",
    openvino: bool = True,
    tensorrt: bool = True,
) -> BenchReport:
    """Inference engines against torchvision eager fp32; see the module docstring.

    On a GPU (``device`` auto or cuda) the PyTorch engines run there, with fp16 added, the
    ONNX Runtime and OpenVINO engines (CPU ones) are left out, and TensorRT fp32, fp16 and int8
    are added (each row says why where TensorRT cannot run). The int8 engine is calibrated on the
    timed images themselves: fine for speed, optimistic for its agreement column.

    ``images`` (N, C, H, W), preprocessed, is the input, or images read from the folder
    ``data`` with the weights' preprocessing (real photos make the agreement column
    meaningful); random when neither is given. ``batch`` images are timed per call.
    """
    dev = runtime.pick_device(device)
    base_model, ours = _models(arch, weights, None)
    base_model.eval().to(dev)
    size = _input_size(arch, ours, img_size)
    if data is not None and images is None:
        cfg = ours.pretrained_cfg
        images = load_images(
            data, batch, size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        )
    if images is None:
        images = torch.randn(batch, 3, size, size)
    x = images[:batch].contiguous()
    x = x.repeat(math.ceil(batch / len(x)), 1, 1, 1)[:batch].to(dev)
    gflop = forward_gflop(ours, tuple(x.shape[1:]))
    roof = gemm_roof(device=dev)
    report = BenchReport(
        f"{arch} inference on {dev.type}, batch {len(x)} and batch 1, {x.shape[-1]} px",
        machine_summary(),
        roof,
        info={"GFLOP per image": round(gflop, 2), "input": f"{len(x)} images"},
    )
    work = Path(tempfile.mkdtemp(prefix="resfit-bench-"))
    engines = _inference_engines(arch, base_model, ours, x, dev, work, bf16=bf16,
                                 compile=compile, onnx=onnx, openvino=openvino,
                                 tensorrt=tensorrt)  # fmt: skip
    built = _build_engines(engines, x, dev, report)
    batch_s = _interleaved(
        {k: _synced(lambda f=v[1]: f(x), dev) for k, v in built.items()}, repeats
    )
    one_s = _interleaved(
        {k: _synced(lambda f=v[1]: f(x[:1]), dev) for k, v in built.items()}, 3 * repeats
    )
    shutil.rmtree(work, ignore_errors=True)  # the sessions hold the models in memory
    after = gemm_roof(device=dev)
    report.roof = {k: max(v, after[k]) for k, v in roof.items()}  # others only lower it
    base_name = engines[0][0]
    base_pred = built[base_name][3] if base_name in built else None
    for name, (precision, _, setup, pred) in built.items():
        ips = len(x) / batch_s[name]
        agreement = (pred == base_pred).float().mean().item() if base_pred is not None else math.nan
        report.rows.append(
            BenchRow(name, precision, ips, ratio=ips * batch_s.get(base_name, math.nan) / len(x),
                     roof_fraction=ips * gflop / report.roof.get(precision, math.nan),
                     latency_ms=1e3 * one_s[name],
                     latency_ratio=one_s[name] / one_s.get(base_name, math.nan),
                     setup_s=setup, agreement=agreement)
        )  # fmt: skip
    return report


def _inference_engines(
    arch: str, base_model: nn.Module, ours: nn.Module, x: Tensor, dev: torch.device, work: Path,
    *, bf16: bool, compile: bool, onnx: bool, openvino: bool = True, tensorrt: bool = True,
) -> list[tuple[str, str, Callable]]:  # fmt: skip
    """(name, precision, builder) of every engine to time; the baseline first."""

    def baseline():
        def fn(t: Tensor) -> Tensor:
            with torch.inference_mode():
                return base_model(t)

        return fn

    def fast(precision: str, compiled: bool = False):
        return lambda: runtime.prepare_for_inference(ours, dev, precision, compiled)

    def onnx_engine(int8: bool):
        def build():
            import numpy as np

            from .export import OnnxClassifier, export_onnx, quantize_int8

            src = work / "model.onnx"
            if not src.exists():
                export_onnx(ours, src, input_size=x.shape[-1])
            path = src
            if int8:
                calib = x.numpy()
                batches = (calib[i : i + 8] for i in range(0, len(calib), 8))
                path = quantize_int8(src, work / "model_int8.onnx", batches)
            session = OnnxClassifier(path, threads=torch.get_num_threads())
            return lambda t: torch.from_numpy(np.asarray(session(t.cpu().numpy())))

        return build

    engines: list[tuple[str, str, Callable]] = [
        (f"{'torchvision' if arch in _TORCHVISION else 'eager'} fp32 (baseline)", "fp32", baseline),
        ("resfit fp32 (BN folded, channels-last)", "fp32", fast("fp32")),
    ]
    if bf16:
        engines.append(("resfit bf16 autocast", "bf16", fast("bf16")))
    if dev.type == "cuda":
        engines.append(("resfit fp16 autocast", "fp16", fast("fp16")))
    if compile:
        best = runtime.pick_precision(dev, "auto")
        engines.append((f"resfit {best} + torch.compile", best, fast(best, True)))
    if onnx and dev.type == "cpu":
        engines += [
            ("ONNX Runtime fp32", "fp32", onnx_engine(False)),
            ("ONNX Runtime int8", "int8", onnx_engine(True)),
        ]
    if openvino and dev.type == "cpu" and importlib.util.find_spec("openvino") is not None:
        engines += [
            (f"OpenVINO {p}", p, _openvino_builder(ours, x, p)) for p in ("fp32", "bf16", "int8")
        ]
    if tensorrt and dev.type == "cuda":
        engines += [
            (f"TensorRT {p}", p, _tensorrt_builder(ours, x, work, p))
            for p in ("fp32", "fp16", "int8")
        ]
    return engines


def _tensorrt_builder(model: nn.Module, x: Tensor, work: Path, precision: str) -> Callable:
    """TensorRT (ONNX Runtime's provider) at ``precision``, its engine built here (no cache:
    the setup column is the build); int8 is symmetric QDQ calibrated on the timed images
    themselves (fine for speed, optimistic for the agreement column)."""

    def build():
        from .export import export_onnx, quantize_int8
        from .tensorrt_engine import TensorRtEngine, require_tensorrt

        require_tensorrt()  # the reason in the row, before a minute of exporting
        path = work / "model.onnx"
        if not path.exists():
            export_onnx(model, path, input_size=x.shape[-1], in_chans=x.shape[1])
        if precision == "int8":
            calib = x.cpu().numpy()
            batches = (calib[i : i + 8] for i in range(0, len(calib), 8))
            path = quantize_int8(path, work / "model_trt_int8.onnx", batches, symmetric=True)
        return TensorRtEngine(path, precision, input_shape=tuple(x.shape[1:]),
                              max_batch=len(x), cache=False, source="bench")  # fmt: skip

    return build


def _openvino_builder(model: nn.Module, x: Tensor, precision: str) -> Callable:
    """OpenVINO at ``precision``; int8 is NNCF post-training quantization calibrated on the
    timed images themselves (fine for speed, optimistic for the agreement column)."""

    def build():
        from . import openvino_engine as ove

        ov_model = ove.convert(model, x.shape[-1], x.shape[1])
        if precision == "int8":
            ov_model = ove.quantize(ov_model, [x.numpy()])
        return ove.OpenVinoEngine(ov_model, precision)

    return build


def _build_engines(
    engines: list[tuple[str, str, Callable]], x: Tensor, dev: torch.device, report: BenchReport
) -> dict[str, tuple[str, Callable, float, Tensor]]:
    """Build and warm up each engine: name -> (precision, callable, setup s, predictions). One
    that cannot run here is a row saying why, not a crash."""
    built: dict[str, tuple[str, Callable, float, Tensor]] = {}
    for name, precision, build in engines:
        t0 = time.perf_counter()
        try:
            fn = build()
            pred = fn(x).argmax(1).cpu()  # first calls: allocation, compilation
            fn(x[:1])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except Exception as e:  # an engine that cannot run here is a finding, not a crash
            report.rows.append(BenchRow(name, precision, math.nan, note=f"skipped: {e}"[:140]))
            continue
        built[name] = (precision, fn, time.perf_counter() - t0, pred)
        log.info("  %s ready (%.1f s)", name, time.perf_counter() - t0)
    return built


# ---------------------------------------------------------------------------------------------
# Training step


def _naive_step(base_model: nn.Module, x: Tensor, y: Tensor, lr: float, wd: float) -> Callable:
    """The loop users write: train mode, fp32 NCHW, SGD over every parameter."""
    model = copy.deepcopy(base_model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)

    def step() -> float:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _resfit_step(
    ours: nn.Module, x: Tensor, y: Tensor, lr: float, wd: float, precision: str,
    compiled: bool = False,
) -> Callable[[], Callable[[], float]]:  # fmt: skip
    """A builder of resfit's step: the TrainStep train() runs, with its optimizer groups."""

    def build() -> Callable[[], float]:
        model = copy.deepcopy(ours).train().to(memory_format=torch.channels_last)
        opt = make_optimizer(TrainConfig().optim, param_groups(model, wd), lr)  # Nesterov SGD
        # fp16 gets the loss scaling training adds (its GradScaling callback).
        scaler = torch.amp.GradScaler(x.device.type) if precision == "fp16" else None
        # No label smoothing: the first-step loss must equal the naive side's.
        step = TrainStep(opt, SingleLabel(label_smoothing=0.0).loss, x.device, precision,
                         scaler=scaler)  # fmt: skip
        net = torch.compile(model) if compiled else model
        return lambda: step(net, x, y)[1].item()

    return build


def bench_train_step(
    arch: str = "resnet50",
    *,
    batch: int = 32,
    img_size: int | None = None,
    num_classes: int = 10,
    repeats: int = 5,
    compile: bool = False,
    bf16: bool = True,
    device: str = "auto",
) -> BenchReport:
    """A training step (forward, loss, backward, SGD update), naive loop against resfit's.

    Naive: torchvision's model in train mode, fp32 NCHW, ``torch.optim.SGD`` over every
    parameter, ``F.cross_entropy``: the loop users write, kept naive on purpose (it is the
    baseline). resfit: :class:`~resfit.training.step.TrainStep`, the very step ``train()``
    runs (channels-last, autocast at the precision ``auto`` picks here, and bf16 for
    comparison, the task's loss), with resfit's optimizer and its groups (no weight decay on
    norms and biases). Same initial weights and batch, same lr, momentum and weight decay, no
    label smoothing on either side, so the first-step losses must agree (they are reported).
    Each step ends in ``loss.item()``, which also waits for a GPU to finish.
    """
    device = runtime.pick_device(device)
    base_model, ours = _models(arch, None, num_classes)
    base_model.to(device)
    ours.to(device)
    size = _input_size(arch, ours, img_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    gflop = 3 * forward_gflop(ours, (3, size, size))  # forward + backward (twice the forward)
    roof = gemm_roof(device=device)
    auto = runtime.pick_precision(device, "auto")
    report = BenchReport(
        f"{arch} training step on {device.type}, batch {batch}, {size} px, SGD",
        machine_summary(),
        roof,
        info={"GFLOP per image (fwd+bwd)": round(gflop, 2), "resfit auto precision": auto},
    )
    lr, weight_decay = 0.01, 5e-4  # both sides

    engines: list[tuple[str, str, Callable]] = [
        (
            f"naive {'torchvision ' if arch in _TORCHVISION else ''}fp32 NCHW (baseline)",
            "fp32",
            lambda: _naive_step(base_model, x, y, lr, weight_decay),
        ),
        (f"resfit {auto} channels-last", auto, _resfit_step(ours, x, y, lr, weight_decay, auto)),
    ]
    if bf16 and auto != "bf16":
        engines.append(("resfit bf16 autocast channels-last", "bf16",
                        _resfit_step(ours, x, y, lr, weight_decay, "bf16")))  # fmt: skip
    if compile:
        engines.append((f"resfit {auto} + torch.compile", auto,
                        _resfit_step(ours, x, y, lr, weight_decay, auto, True)))  # fmt: skip

    built = _warm_up_steps(engines, report)
    secs = _interleaved({k: v[1] for k, v in built.items()}, repeats)
    after = gemm_roof(device=device)
    report.roof = {k: max(v, after[k]) for k, v in roof.items()}
    base_name = engines[0][0]
    for name, (precision, _, setup, first) in built.items():
        ips = batch / secs[name]
        report.rows.append(
            BenchRow(name, precision, ips, ratio=secs.get(base_name, math.nan) / secs[name],
                     roof_fraction=ips * gflop / report.roof.get(precision, math.nan),
                     setup_s=setup, first_loss=first)
        )  # fmt: skip
    return report


def _warm_up_steps(
    engines: list[tuple[str, str, Callable]], report: BenchReport
) -> dict[str, tuple[str, Callable, float, float]]:
    """Build each step and take its first step (warm-up and compilation): name -> (precision,
    step, setup s, first loss). One that cannot run here is a row saying why."""
    built: dict[str, tuple[str, Callable, float, float]] = {}
    for name, precision, build in engines:
        t0 = time.perf_counter()
        try:
            step = build()
            first = step()
        except Exception as e:
            report.rows.append(BenchRow(name, precision, math.nan, note=f"skipped: {e}"[:140]))
            continue
        built[name] = (precision, step, time.perf_counter() - t0, first)
        log.info("  %s ready (%.1f s)", name, time.perf_counter() - t0)
    return built


# ---------------------------------------------------------------------------------------------
# Data pipeline


def _pil_transform(cfg: AugmentConfig, img_size: int) -> Callable:
    """``cfg``'s augmentation as users write it with torchvision's classic PIL transforms."""
    from torchvision import transforms as T

    c = cfg.resolved(img_size)
    ops: list[Callable] = []
    if c.crop_scale != (1.0, 1.0):
        ops.append(T.RandomResizedCrop(img_size, scale=c.crop_scale))
    else:
        ops += [T.Resize(base_size_for(img_size)), T.CenterCrop(img_size)]
    if c.hflip:
        ops.append(T.RandomHorizontalFlip(c.hflip))
    if c.vflip:
        ops.append(T.RandomVerticalFlip(c.vflip))
    if c.rotation or c.translate or c.zoom != (1.0, 1.0):
        translate = (c.translate, c.translate) if c.translate else None
        zoom = c.zoom if c.zoom != (1.0, 1.0) else None
        ops.append(T.RandomAffine(c.rotation, translate=translate, scale=zoom))
    if c.color_jitter:
        ops.append(T.ColorJitter(c.color_jitter, c.color_jitter, c.color_jitter))
    if c.policy == "trivialaugment":
        ops.append(T.TrivialAugmentWide())
    elif c.policy == "randaugment":
        ops.append(T.RandAugment())
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if c.erasing:
        ops.append(T.RandomErasing(c.erasing))
    return T.Compose(ops)


def _naive_pipeline(paths: list, labels: list, tf: Callable, batch: int) -> Callable[[], None]:
    """One epoch of torchvision ImageFolder-style loading: PIL decodes every file every epoch,
    through a 0-worker DataLoader (the default)."""
    from PIL import Image

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with Image.open(paths[i]) as im:
                return tf(im.convert("RGB")), labels[i]

    def epoch() -> None:
        for _ in torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True):
            pass

    return epoch


def bench_pipeline(
    data: str | Path,
    *,
    img_size: int = 224,
    augment: str = "standard",
    limit: int = 512,
    batch: int = 32,
    epochs: int = 2,
    consumer_images_per_s: float | None = None,
) -> BenchReport:
    """Decode + augment images/s on the training images of ``data`` (at most ``limit``).

    Naive: torchvision ``ImageFolder``-style loading (PIL decode of every file every epoch,
    then the same augmentation written with the classic PIL transforms, ToTensor, Normalize)
    through a ``DataLoader`` with 0 workers, the default. resfit: :func:`~resfit.data.decode_all` once (its rate is a row of its own), then
    ``epochs`` epochs of its augmentation preset from memory, as ``train()`` runs them.
    ``consumer_images_per_s`` (the training step's rate) adds how many times faster the
    pipeline is than the step that consumes it.
    """
    splits = discover(str(data))
    step = max(1, len(splits.train) // limit)
    samples = splits.train[::step][:limit]
    paths = [s.path for s in samples]
    labels = [s.label for s in samples]
    report = BenchReport(
        f"data pipeline: {len(samples)} training images of {data}, {img_size} px, "
        f"augment {augment!r}, batch {batch}",
        machine_summary(),
        {},
    )
    naive_epoch = _naive_pipeline(
        paths, labels, _pil_transform(AugmentConfig(augment), img_size), batch
    )

    t0 = time.perf_counter()
    decoded = decode_all(samples, base_size_for(img_size), progress=False)
    decode_s = time.perf_counter() - t0
    tf = train_transform(AugmentConfig(augment), img_size, IMAGENET_MEAN, IMAGENET_STD)
    dataset = TransformedImages(decoded, tf)
    index_batches = [
        list(range(i, min(i + batch, len(dataset)))) for i in range(0, len(dataset), batch)
    ]

    def resfit_epoch() -> None:
        for _ in iter_batches(dataset, index_batches):
            pass

    secs = _interleaved({"naive": naive_epoch, "resfit": resfit_epoch}, epochs)
    n = len(decoded)
    naive_ips, resfit_ips = n / secs["naive"], n / secs["resfit"]
    report.rows = [
        BenchRow("naive: decode + augment every epoch (baseline)", "", naive_ips, ratio=1.0),
        BenchRow("resfit: decode once", "", n / decode_s, note="paid once per run, in threads"),
        BenchRow(f"resfit: augment {augment!r} per epoch", "", resfit_ips,
                 ratio=resfit_ips / naive_ips),
    ]  # fmt: skip
    if consumer_images_per_s:
        report.info["training step consumes"] = f"{consumer_images_per_s:.1f} images/s"
        report.info["resfit pipeline / consumption"] = f"{resfit_ips / consumer_images_per_s:.1f}x"
        report.info["naive pipeline / consumption"] = f"{naive_ips / consumer_images_per_s:.1f}x"
    return report


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


def bench_sources(
    data: str | Path,
    *,
    img_size: int = 224,
    augment: str = "standard",
    limit: int = 512,
    batch: int = 32,
    epochs: int = 2,
    workers: tuple[int, ...] = (1, 2),
    consumer_images_per_s: float | None = None,
    modes: tuple[str, ...] | None = None,
) -> BenchReport:
    """Images/s and peak memory of each data mode as ``train()`` runs it, per worker count:
    ``stream`` (decode + augment every image every epoch, in the DataLoader workers),
    ``shards`` (the same from the pre-resized JPEGs ``resfit prepare`` wrote: its one-off
    writing time is reported apart) and ``memory`` (decode once, here in threads, then augment
    in the workers). The rate is over ``epochs`` epochs of the first ``limit`` training images
    of ``data``; memory's includes its decoding, as a run of ``epochs`` epochs pays it."""
    from .sources import Sharding, get_source

    if modes is None:  # shards where LitData is installed (resfit[shards])
        has_litdata = importlib.util.find_spec("litdata") is not None
        modes = ("stream", "shards", "memory") if has_litdata else ("stream", "memory")
    splits = discover(str(data))
    samples = splits.train[:: max(1, len(splits.train) // limit)][:limit]
    tf = train_transform(AugmentConfig(augment), img_size, IMAGENET_MEAN, IMAGENET_STD)
    report = BenchReport(
        f"data modes: {len(samples)} training images of {data}, {img_size} px, augment "
        f"{augment!r}, batch {batch}, {epochs} epochs",
        machine_summary(),
        {},
    )
    sharding = Sharding.plan(len(samples), batch, 0, 1, seed=0)
    work = Path(tempfile.mkdtemp(prefix="resfit-bench-shards-"))
    try:
        opened_by_mode = {m: [samples[i] for i in sharding.ids] for m in modes}
        if "shards" in modes:
            opened_by_mode["shards"] = _prepared(samples, splits.classes, img_size, work, report)
            opened_by_mode["shards"] = [opened_by_mode["shards"][i] for i in sharding.ids]
        for mode in modes:
            for w in workers:
                with PeakMemory() as mem:
                    t0 = time.perf_counter()
                    source = get_source(mode)
                    opened = source.open(opened_by_mode[mode], base_size_for(img_size),
                                         progress=False, desc="")  # fmt: skip
                    dataset = TransformedImages(opened, tf)
                    for e in range(epochs):
                        for _ in source.batches(dataset, sharding.epoch(e), w, seed=e):
                            pass
                    secs = time.perf_counter() - t0
                rate = sharding.steps * batch * epochs / secs
                note = (
                    f"peak PSS {mem.pss / 1e9:.2f} GB, RSS {mem.rss / 1e9:.2f} (process + workers)"
                )
                if consumer_images_per_s:
                    note += f", {rate / consumer_images_per_s:.1f}x the step"
                report.rows.append(BenchRow(f"{mode}, {w} worker(s)", "", rate, note=note))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if consumer_images_per_s:
        report.info["training step consumes"] = f"{consumer_images_per_s:.1f} images/s"
    return report


def _prepared(samples: list, classes: list[str], img_size: int, work: Path,
              report: BenchReport) -> list:  # fmt: skip
    """``samples`` written by ``resfit prepare`` (as a manifest of train rows) and read back."""
    import csv

    from .shards import prepare, read_splits

    with open(work / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([str(s.path), classes[s.label], "train"] for s in samples)
        w.writerow([str(samples[0].path), classes[samples[0].label], "val"])  # val needs one
    t0 = time.perf_counter()
    prepare(work / "m.csv", work / "shards", img_size=img_size, progress=False)
    secs = time.perf_counter() - t0
    report.info["resfit prepare"] = f"{secs:.1f} s ({len(samples) / secs:.0f} images/s, once)"
    return read_splits(work / "shards").train

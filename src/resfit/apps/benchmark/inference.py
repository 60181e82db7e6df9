"""``resfit bench inference``: batch throughput and batch-1 latency of torchvision eager fp32
(the baseline) against resfit's engines on the same input, with each engine's top-1 agreement.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ...core import runtime
from ...inference import folding
from ...models.weights import IMAGENET_MEAN, IMAGENET_STD
from .common import (
    TORCHVISION_ARCHS,
    BenchReport,
    BenchRow,
    baseline_and_ours,
    bench_input_size,
    forward_gflop,
    gemm_roof,
    interleaved,
    load_images,
    machine_summary,
    synced,
)

log = logging.getLogger("resfit")


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
    base_model, ours = baseline_and_ours(arch, weights, None)
    base_model.eval().to(dev)
    x = _timed_input(ours, bench_input_size(arch, ours, img_size), images, data, batch).to(dev)
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
    batch_s = interleaved({k: synced(lambda f=v[1]: f(x), dev) for k, v in built.items()}, repeats)
    one_s = interleaved(
        {k: synced(lambda f=v[1]: f(x[:1]), dev) for k, v in built.items()}, 3 * repeats
    )
    shutil.rmtree(work, ignore_errors=True)  # the sessions hold the models in memory
    after = gemm_roof(device=dev)
    report.roof = {k: max(v, after[k]) for k, v in roof.items()}  # others only lower it
    _add_rows(report, built, engines[0][0], batch_s, one_s, len(x), gflop)
    return report


def _timed_input(ours: nn.Module, size: int, images: Tensor | None, data: str | Path | None,
                 batch: int) -> Tensor:  # fmt: skip
    """``batch`` images to time on: ``images``, else read from ``data`` with the weights'
    preprocessing, else random; repeated to fill the batch."""
    if data is not None and images is None:
        cfg = ours.pretrained_cfg
        images = load_images(
            data, batch, size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        )
    if images is None:
        images = torch.randn(batch, 3, size, size)
    x = images[:batch].contiguous()
    return x.repeat(math.ceil(batch / len(x)), 1, 1, 1)[:batch]


def _add_rows(report: BenchReport, built: dict, base_name: str, batch_s: dict[str, float],
              one_s: dict[str, float], n: int, gflop: float) -> None:  # fmt: skip
    """One row per engine built: its rate, its latency at batch 1 and its agreement with the
    baseline's predictions, each against the baseline's."""
    base_pred = built[base_name][3] if base_name in built else None
    for name, (precision, _, setup, pred) in built.items():
        ips = n / batch_s[name]
        agreement = (pred == base_pred).float().mean().item() if base_pred is not None else math.nan
        report.rows.append(
            BenchRow(name, precision, ips, ratio=ips * batch_s.get(base_name, math.nan) / n,
                     roof_fraction=ips * gflop / report.roof.get(precision, math.nan),
                     latency_ms=1e3 * one_s[name],
                     latency_ratio=one_s[name] / one_s.get(base_name, math.nan),
                     setup_s=setup, agreement=agreement)
        )  # fmt: skip


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
        return lambda: folding.prepare_for_inference(ours, dev, precision, compiled)

    engines: list[tuple[str, str, Callable]] = [
        (
            f"{'torchvision' if arch in TORCHVISION_ARCHS else 'eager'} fp32 (baseline)",
            "fp32",
            baseline,
        ),
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
            ("ONNX Runtime fp32", "fp32", _onnx_builder(ours, x, work, False)),
            ("ONNX Runtime int8", "int8", _onnx_builder(ours, x, work, True)),
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


def _onnx_builder(ours: nn.Module, x: Tensor, work: Path, int8: bool) -> Callable:
    """ONNX Runtime on the model exported to ``work`` (once), int8 calibrated on ``x``."""

    def build():
        import numpy as np

        from ...export.onnx import export_onnx, quantize_int8
        from ...inference.engines import OnnxClassifier

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


def _tensorrt_builder(model: nn.Module, x: Tensor, work: Path, precision: str) -> Callable:
    """TensorRT (ONNX Runtime's provider) at ``precision``, its engine built here (no cache:
    the setup column is the build); int8 is symmetric QDQ calibrated on the timed images
    themselves (fine for speed, optimistic for the agreement column)."""

    def build():
        from ...export.onnx import export_onnx, quantize_int8
        from ...inference.tensorrt import TensorRtEngine, require_tensorrt

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
        from ...inference import openvino as ove

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

"""Exporting a run: the formats (ONNX fp32 and int8, OpenVINO, TensorRT, Triton; for phones and
boards ExecuTorch, LiteRT, NCNN and CoreML, :mod:`resfit.export.edge`), the
validation images that check an int8 model, and ``export.json``.

ONNX Runtime is the CPU engine (``resfit predict --engine onnx``, :mod:`resfit.inference.engines`): on the
project's AVX-512 VNNI Xeon (no AVX512_BF16/AMX), static int8 is the one precision faster than
fp32 (``resfit bench`` prints the figures). ``onnx``/``onnxruntime`` are optional (``pip install
'resfit[export]'``) and imported only inside the functions that need them.

Every file is written to a temporary name beside the target and renamed into place, so an
interrupted export never leaves a truncated model where a good one was expected.

Add a format: a function ``(ExportJob) -> report dict`` that writes into ``job.out_dir``,
``FORMATS.register(name, fn)``, its name in ``core.config.EXPORT_FORMATS`` (the CLI's
``--format`` choices) and, to run it, an engine in :mod:`resfit.inference.engines`.

This module builds on :mod:`resfit.inference.predictor` and :mod:`resfit.inference.engines` (which runs the files
written here); neither imports it. ``OnnxClassifier`` lives in :mod:`resfit.inference.engines` and is
re-exported here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.atomic import atomic_write_json
from ..core.config import EXPORT_FORMATS
from ..core.errors import ConfigError, DataError
from ..core.labels import CODINGS
from ..core.registry import Registry
from ..data.datasets import DecodedImages, decode_all
from ..data.discovery import discover, eval_samples, read_splits
from ..data.paths import display_path, find_images
from ..data.samples import DataSplits, Sample
from ..inference.engines import OnnxClassifier
from ..inference.predictor import Predictor
from ..runs import EXPORT_REPORT, RunPaths, load_qat_model, load_run, read_unknown
from .onnx import DEFAULT_OPSET, export_int8_graph, export_onnx, onnx_parity, quantize_int8

log = logging.getLogger("resfit")

__all__ = ["FORMATS", "ExportJob", "export_run"]


# ---------------------------------------------------------------------------------------------
# Exporting a run folder (what `resfit export RUN` does)


def _batches(predictor: Predictor, decoded: DecodedImages, size: int = 32) -> Iterator[np.ndarray]:
    """Decoded images preprocessed as the run's model takes them, as float32 NCHW batches."""
    for i in range(0, len(decoded), size):
        x = torch.stack([predictor.transform(img) for img in decoded.images[i : i + size]])
        yield x.numpy().astype(np.float32)


def pick_samples(items: Sequence, limit: int, seed: int = 0) -> list:
    """Up to ``limit`` of ``items``, drawn evenly at random (in their order)."""
    if len(items) <= limit:
        return list(items)
    rng = np.random.default_rng(seed)
    return [items[i] for i in sorted(rng.choice(len(items), limit, replace=False))]


def _as_run_classes(splits: DataSplits, classes: Sequence[str], where: str) -> list[Sample]:
    """The val samples of ``splits`` labelled by the run's class indices (multi-label: as
    multi-hot tuples over the run's classes)."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(splits.classes) - set(index))
    if unknown:
        raise DataError(f"{where} has classes the run does not know: {', '.join(unknown)}")
    coding, k = CODINGS.get(splits.task), len(classes)  # the labels stay in their coding
    return [Sample(s.path, coding.from_classes([index[splits.classes[j]]
                                                for j in coding.classes_of(s.label)], k))
            for s in splits.val]  # fmt: skip


def _rederived_val(cfg: dict, classes: Sequence[str]) -> list[Sample]:
    """The run's validation split, found again from its data with its seed and fractions."""
    splits = discover(
        cfg["data"],
        val_fraction=cfg.get("val_fraction", 0.15),
        test_fraction=cfg.get("test_fraction", 0.0),
        seed=cfg.get("seed", 0),
        task=cfg.get("task") or "auto",
    )
    return _as_run_classes(splits, classes, display_path(cfg["data"]))


def validation_samples(
    run: str | os.PathLike, cfg: dict, classes: Sequence[str], val: str | os.PathLike | None
) -> tuple[list[Sample], str]:
    """Labelled images to measure an export on, and a sentence saying which ones they are.

    In order: ``val`` (a folder of class folders, a data root's test/ or val/, or a manifest);
    the ``val`` rows of ``RUN/splits.csv``; the validation split of the run's data found again
    with its seed. Never the training images: with none of these there is no measurement.
    """
    if val:
        task = cfg.get("task") or "single"  # runs from before multi-label: single
        return eval_samples(val, classes, task=task)[0], f"--val {display_path(val)}"
    splits_csv = RunPaths(run).splits
    shown = display_path(splits_csv)
    if splits_csv.is_file():
        val_rows = _as_run_classes(read_splits(splits_csv), classes, shown)
        return val_rows, f"the val rows of {shown}"
    data = cfg.get("data")
    if data and Path(data).exists():
        where = (
            f"the val split of {display_path(data)} (found again with the run's seed; no {shown})"
        )
        return _rederived_val(cfg, classes), where
    return [], f"none: {shown} and the run's data are missing (pass --val DATA)"


def _export_fp32(predictor: Predictor, classes: list[str], out_dir: Path, opset: int) -> Path:
    pre = predictor.preprocessing
    model = predictor.model
    # What a runner of the file needs, in the file: labels and the run's preprocessing.
    model.pretrained_cfg = {
        "mean": list(pre.mean),
        "std": list(pre.std),
        "input_size": pre.img_size,
        "resize_size": pre.decode_size,
        "interpolation": pre.interpolation,
        "categories": classes,
    }
    return export_onnx(
        model, out_dir / "model.onnx", input_size=pre.img_size, in_chans=pre.in_chans, opset=opset
    )


def _quantize_run(
    predictor: Predictor, fp32_path: Path, target: Path, calib: str | os.PathLike, limit: int,
    symmetric: bool = False,
) -> tuple[Path, int]:  # fmt: skip
    paths = pick_samples(find_images([str(calib)]), limit)
    decoded = predictor.decode(paths)
    if not len(decoded):
        raise DataError(f"--calib {display_path(calib)}: none of its images could be read")
    batches = _batches(predictor, decoded)
    return quantize_int8(fp32_path, target, batches, symmetric=symmetric), len(decoded)


def _tensorrt_checks(
    model: nn.Module, fp32_path: Path, int8_path: Path | None, batches: list[np.ndarray],
    labels: np.ndarray | None, input_shape: tuple[int, int, int],
) -> dict[str, Any]:  # fmt: skip
    """``--format tensorrt``: the engines TensorRT builds from the files just written, against
    PyTorch fp32 on the check images (max logit difference, top-1 agreement and, with labels,
    the accuracy change), on this machine's GPU; skipped, with the reason, without one."""
    from ..inference.tensorrt import TensorRtEngine, probe
    from .edge import compare  # the edge formats' checks: one computation of the metrics

    usable, why = probe()
    if not usable or not batches:
        return {"tensorrt_check": f"skipped: {why if not usable else 'no check images'}"}
    x = np.concatenate(batches)
    with torch.inference_mode():
        reference = model.float().eval().cpu()(torch.from_numpy(x)).numpy()
    report: dict[str, Any] = {"tensorrt_check": why}
    runs = [("fp32", fp32_path), ("fp16", fp32_path)] + ([("int8", int8_path)] if int8_path else [])
    for precision, path in runs:
        engine = TensorRtEngine(path, precision, input_shape=input_shape, source="export check")
        logits = engine(torch.from_numpy(x)).float().numpy()
        got = compare(logits, reference, labels)
        report.update({f"tensorrt_{precision}_{k}": v for k, v in got.items()})
    return report


def _int8_accuracy(
    fp32_path: Path, int8_path: Path, batches: list[np.ndarray], y: np.ndarray
) -> dict[str, float]:
    fp32 = np.concatenate([OnnxClassifier(fp32_path)(b) for b in batches])
    q = np.concatenate([OnnxClassifier(int8_path)(b) for b in batches])
    if y.ndim == 2:  # multi-label: the check is in mAP, the agreement in per-class decisions
        from ..tasks.multi import mean_average_precision

        map32, map8 = mean_average_precision(fp32, y), mean_average_precision(q, y)
        return {"fp32_mAP": map32, "int8_mAP": map8, "int8_mAP_change": map8 - map32,
                "label_agreement": float(((fp32 > 0) == (q > 0)).mean())}  # fmt: skip
    fp32, q = fp32.argmax(1), q.argmax(1)
    acc32, acc8 = float((fp32 == y).mean()), float((q == y).mean())
    return {
        "fp32_accuracy": acc32,
        "int8_accuracy": acc8,
        "int8_accuracy_change": acc8 - acc32,
        "top1_agreement": float((q == fp32).mean()),
    }


@dataclass(frozen=True)
class ExportJob:
    """What every format's exporter gets: the run, its model (as a PyTorch Predictor) and the
    options of ``resfit export``."""

    run: Path
    cfg: dict[str, Any]
    classes: list[str]
    predictor: Predictor
    out_dir: Path
    int8: bool = False
    calib: str | os.PathLike | None = None
    val: str | os.PathLike | None = None
    calib_images: int = 256
    val_images: int = 1000
    opset: int = DEFAULT_OPSET
    name: str | None = None
    max_batch: int = 32
    max_queue_delay_us: int = 5000


@dataclass
class _OnnxExport:
    """An exported ONNX model with the images it was checked on."""

    report: dict[str, Any]
    fp32_path: Path
    checked: DecodedImages
    batches: list[np.ndarray]
    source: str


def _export_onnx_checked(job: ExportJob) -> _OnnxExport:
    """The fp32 ONNX file and its parity check against PyTorch on validation images."""
    fp32_path = _export_fp32(job.predictor, job.classes, job.out_dir, job.opset)
    report: dict[str, Any] = {"onnx": str(fp32_path), "opset": job.opset}
    samples, source = validation_samples(job.run, job.cfg, job.classes, job.val)
    # Decoded with their labels: a file that cannot be read drops out with its label. Without
    # int8 only the parity check needs images, and 64 are enough for it.
    limit = job.val_images if job.int8 else 64
    pred = job.predictor
    checked = decode_all(pick_samples(samples, limit), pred.base_size, progress=False, window=pred.window)  # fmt: skip
    report.update(val_source=source, val_images=len(checked), val_skipped=len(checked.skipped))
    batches = _parity_check(job.predictor, fp32_path, checked, job.calib, report)
    return _OnnxExport(report, fp32_path, checked, batches, source)


def _qat_int8(job: ExportJob, fp32_path: Path | None, target: Path) -> Path | None:
    """The int8 ONNX file of a run trained with ``--qat`` (its own learned ranges, no
    calibration), or None for a run without one."""
    state = load_qat_model(job.run)
    if state is None:
        return None
    from ..inference.predictor import load_run_model
    from ..models.qat import convert_qat

    pre = job.predictor.preprocessing
    example = torch.randn(2, pre.in_chans, pre.img_size, pre.img_size)
    graph = convert_qat(load_run_model(job.run)[0], state, example)
    log.info(
        "int8 from quantization-aware training (%s), no calibration", RunPaths(job.run).qat_model
    )
    return export_int8_graph(graph, fp32_path, target, example)


def _int8_checked(job: ExportJob, done: _OnnxExport, target: Path, symmetric: bool) -> Path:
    """The int8 file (from the run's QAT graph where it has one, else quantized on the
    calibration images), with its accuracy change on the validation images in ``done.report``."""
    qat = None if symmetric else _qat_int8(job, done.fp32_path, target)
    if qat is not None:
        int8_path, n_calib = qat, 0
    else:
        int8_path, n_calib = _quantize_run(job.predictor, done.fp32_path, target, job.calib,
                                           job.calib_images, symmetric=symmetric)  # fmt: skip
    done.report.update({"tensorrt_int8" if symmetric else "int8": str(int8_path),
                        "calib_images": n_calib, "int8_from": "qat" if qat else "calibration"})  # fmt: skip
    if len(done.checked):
        # For the TensorRT file: its accuracy in ONNX Runtime on the CPU, the same QDQ graph.
        y = done.checked.labels.numpy()
        done.report.update(_int8_accuracy(done.fp32_path, int8_path, done.batches, y))
        log.info("int8 accuracy measured on %d images: %s", len(done.checked), done.source)
    else:
        log.warning("int8 accuracy not measured: no validation images (%s)", done.source)
    return int8_path


def _format_onnx(job: ExportJob) -> dict[str, Any]:
    """``RUN/export/model.onnx`` (and ``model.int8.onnx``, asymmetric static int8)."""
    done = _export_onnx_checked(job)
    if job.int8:
        _int8_checked(job, done, job.out_dir / "model.int8.onnx", symmetric=False)
    return done.report


def _format_tensorrt(job: ExportJob) -> dict[str, Any]:
    """The ONNX model and, with int8, ``tensorrt/model.int8.onnx`` (symmetric: TensorRT takes
    int8 activations with zero point 0 only); on a GPU the TensorRT engines' checks."""
    done = _export_onnx_checked(job)
    int8_path = None
    if job.int8:
        int8_path = _int8_checked(job, done, job.out_dir / "tensorrt" / "model.int8.onnx", True)
    pre = job.predictor.preprocessing
    labels = done.checked.labels.numpy() if len(done.checked) else None
    done.report.update(_tensorrt_checks(job.predictor.model, done.fp32_path, int8_path,
                                        done.batches, labels,
                                        (pre.in_chans, pre.img_size, pre.img_size)))  # fmt: skip
    return done.report


def _format_triton(job: ExportJob) -> dict[str, Any]:
    """The ONNX export, and ``OUT/triton/NAME``: a Triton model repository around it."""
    from .triton import write_triton_repository

    report = _format_onnx(job)
    model_name = job.name or job.run.resolve().name
    report["triton"] = str(write_triton_repository(
        Path(report["onnx"]), job.out_dir / "triton", model_name, classes=job.classes,
        max_batch=job.max_batch, max_queue_delay_us=job.max_queue_delay_us,
    ))  # fmt: skip
    return report


def _checked_batches(job: ExportJob, limit: int) -> tuple[DecodedImages, list, str]:
    """Up to ``limit`` validation images with their labels, as the engine's batches, and where
    they came from (the formats that run their file against PyTorch check on these)."""
    samples, source = validation_samples(job.run, job.cfg, job.classes, job.val)
    pred = job.predictor
    checked = decode_all(pick_samples(samples, limit), pred.base_size, progress=False, window=pred.window)  # fmt: skip
    return checked, list(_batches(job.predictor, checked)), source


def _calib_batches(job: ExportJob) -> list:
    """The ``--calib`` images as the engine's batches; a folder with none readable is an error."""
    decoded = job.predictor.decode(pick_samples(find_images([str(job.calib)]), job.calib_images))
    if not len(decoded):
        raise DataError(f"--calib {display_path(job.calib)}: none of its images could be read")
    return list(_batches(job.predictor, decoded))


def _format_openvino(job: ExportJob) -> dict[str, Any]:
    """OpenVINO IR converted from the run's model (no ONNX step), the parity check, and with
    int8 NNCF quantization and its accuracy change on validation images (as the ONNX path
    measures its own)."""
    from ..inference.openvino import export_openvino

    predictor = job.predictor
    checked, batches, source = _checked_batches(job, job.val_images if job.int8 else 64)
    calib_batches, qat = None, None
    if job.int8 and RunPaths(job.run).qat_model.is_file():
        qat = _openvino_qat(job)
    elif job.int8:
        calib_batches = _calib_batches(job)
    pre = predictor.preprocessing
    report = export_openvino(
        predictor.model, pre.img_size, pre.in_chans, job.out_dir, check=batches,
        labels=checked.labels.numpy() if len(checked) else None, calib=calib_batches,
        int8_model=qat,
    )  # fmt: skip
    report.update(val_source=source, val_images=len(checked), val_skipped=len(checked.skipped))
    if calib_batches:
        report["calib_images"] = sum(len(b) for b in calib_batches)
    return report


def _openvino_qat(job: ExportJob) -> Any:
    """The OpenVINO int8 model of a ``--qat`` run: its QDQ graph read by OpenVINO (which makes
    FakeQuantize ops of it), no calibration."""
    import tempfile

    from ..inference.openvino import _openvino

    with tempfile.TemporaryDirectory(prefix="resfit-qat-") as work:
        path = _qat_int8(job, None, Path(work) / "model.int8.onnx")
        return _openvino().convert_model(str(path))


def _format_edge(format: str) -> Callable[[ExportJob], dict[str, Any]]:
    """A small-device format (:mod:`resfit.export.edge`): ``OUT/FORMAT/model.*``, fp32 and with
    int8 the file quantized on the calibration images, each run in its own runtime against
    PyTorch on the validation images."""

    def export(job: ExportJob) -> dict[str, Any]:
        from .edge import check_edge_options, export_edge

        check_edge_options(format, job.int8)
        predictor = job.predictor
        checked, batches, source = _checked_batches(job, job.val_images)
        calib = _calib_batches(job) if job.int8 else None
        pre = predictor.preprocessing
        report = export_edge(
            format, predictor.model, job.out_dir / format, batches,
            checked.labels.numpy() if len(checked) else None, calib,
            (pre.in_chans, pre.img_size, pre.img_size), len(job.classes),
        )  # fmt: skip
        report.update(val_source=source, val_images=len(checked), val_skipped=len(checked.skipped))
        if calib:
            report["calib_images"] = sum(len(b) for b in calib)
        return report

    return export


ExportFormat = Callable[[ExportJob], dict[str, Any]]
# `resfit export --format NAME`: each writes its files into job.out_dir and returns its report.
FORMATS: Registry[str, ExportFormat] = Registry("export format")
FORMATS.register("onnx", _format_onnx)
FORMATS.register("triton", _format_triton)
FORMATS.register("openvino", _format_openvino)
FORMATS.register("tensorrt", _format_tensorrt)
for _edge in ("executorch", "litert", "ncnn", "coreml"):  # phones and boards: export/edge.py
    FORMATS.register(_edge, _format_edge(_edge))
assert tuple(FORMATS) == EXPORT_FORMATS, "core.config.EXPORT_FORMATS and FORMATS must agree"


def _check_export_options(
    format: str, int8: bool, calib: str | os.PathLike | None, qat: bool = False
) -> None:
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    # A --qat run carries its int8 model for the ONNX-based formats; the others calibrate.
    if int8 and not calib and not (qat and format in ("onnx", "triton", "openvino")):
        raise ConfigError(
            "--int8 needs --calib DATA: a few hundred of your own images to calibrate on"
        )


def _parity_check(predictor: Predictor, fp32_path: Path, checked: Any,
                  calib: str | os.PathLike | None, report: dict[str, Any]) -> list:  # fmt: skip
    """The batches of ``checked`` (else of the calibration images); the largest logit
    difference between PyTorch and the ONNX file on the first 64 images goes into ``report``
    (``max_abs_logit_diff``)."""
    batches = list(_batches(predictor, checked))
    if not batches and calib:
        batches = list(
            _batches(predictor, predictor.decode(pick_samples(find_images([str(calib)]), 64)))
        )
    if batches:
        images = torch.from_numpy(np.concatenate(batches)[:64])
        report["max_abs_logit_diff"] = onnx_parity(predictor.model, fp32_path, images)
    return batches


def export_run(
    run: str | os.PathLike,
    *,
    int8: bool = False,
    calib: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    calib_images: int = 256,
    val_images: int = 1000,
    opset: int = DEFAULT_OPSET,
    format: str = "onnx",
    name: str | None = None,
    max_batch: int = 32,
    max_queue_delay_us: int = 5000,
) -> dict:
    """Export a run to ONNX (``RUN/export/model.onnx``), check it against PyTorch on real images,
    and with ``int8`` quantize it on the user's calibration images and measure the accuracy
    change on validation images (see :func:`validation_samples` for which; ``val_source`` in
    the result says, ``val_images`` and ``val_skipped`` count the images used and unreadable).
    Returns (and writes to export.json) what was measured.

    ``format="openvino"`` writes ``OUT/openvino/model.xml`` (and ``model.int8.xml`` with
    ``int8``) instead of ONNX, with the same checks (:mod:`resfit.inference.openvino`).
    ``format="tensorrt"`` writes the ONNX model and, with ``int8``, ``OUT/tensorrt/
    model.int8.onnx`` (symmetric int8, what TensorRT takes) instead of ``model.int8.onnx``,
    and on a GPU with TensorRT checks the engines built from them against PyTorch
    (``tensorrt_*`` keys; ``tensorrt_check`` says why not where they cannot run).
    ``format="triton"`` also writes a Triton model repository, ``OUT/triton/NAME`` (``name``
    defaults to the run folder's name), with dynamic batching up to ``max_batch`` after at most
    ``max_queue_delay_us``; see :mod:`resfit.export.triton`.
    ``format="executorch" | "litert" | "ncnn" | "coreml"`` writes ``OUT/FORMAT/model.*`` for
    phones and boards, each run in its own runtime against PyTorch on the validation images
    (CoreML: structure only, it runs on Apple systems alone); see :mod:`resfit.export.edge`."""
    _check_export_options(format, int8, calib, RunPaths(run).qat_model.is_file())
    cfg, classes = load_run(run)
    out_dir = Path(out or RunPaths(run).export)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_run(run, device="cpu", precision="fp32", engine="torch")
    job = ExportJob(Path(run), cfg, classes, predictor, out_dir, int8, calib, val, calib_images,
                    val_images, opset, name, max_batch, max_queue_delay_us)  # fmt: skip
    report = FORMATS.get(format)(job)
    unknown = read_unknown(run)
    if unknown is not None:  # predict with any engine flags the same images (its features)
        report["unknown"] = {
            **unknown[0],
            "features": "the pooled features and stage statistics of RUN/model.safetensors",
        }
    atomic_write_json(out_dir / EXPORT_REPORT, report)
    return report

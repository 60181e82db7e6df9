"""Ship a classifier as ONNX: export, parity check, int8 quantization, and exporting a run.

ONNX Runtime is the CPU engine (``resfit predict --engine onnx``, :mod:`resfit.engines`): on the
project's AVX-512 VNNI Xeon (no AVX512_BF16/AMX), static int8 is the one precision faster than
fp32 (``resfit bench`` prints the figures). ``onnx``/``onnxruntime`` are optional (``pip install
'resfit[export]'``) and imported only inside the functions that need them.

Every file is written to a temporary name beside the target and renamed into place, so an
interrupted export never leaves a truncated model where a good one was expected.

This module builds on :mod:`resfit.inference` and :mod:`resfit.engines` (which runs the files
written here); neither imports it. ``OnnxClassifier`` lives in :mod:`resfit.engines` and is
re-exported here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import EXPORT_FORMATS
from .data import (
    DataSplits,
    DecodedImages,
    Sample,
    decode_all,
    discover,
    display_path,
    eval_samples,
    find_images,
    read_splits,
)
from .engines import ONNX_METADATA_KEY, OnnxClassifier
from .errors import ConfigError, DataError, ExportError, MissingExtraError
from .inference import Predictor, load_run

log = logging.getLogger("resfit")

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "OnnxClassifier",
    "export_onnx",
    "export_run",
    "onnx_parity",
    "quantize_int8",
]

# torch's exporter (torch.export based) emits opset 18 natively; it cannot lower these graphs to
# 17 (its Pad and ReduceMean version adapters fail, measured with torch 2.14), so an older opset
# goes through the TorchScript exporter instead. Opset 18 needs ONNX Runtime >= 1.14.
DEFAULT_OPSET = 18
METADATA_KEY = ONNX_METADATA_KEY


def _import_onnx(*also: str) -> Any:
    """The ``onnx`` package, after checking that the modules in ``also`` are installed too."""
    for name in also:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a stubbed-out module (sys.modules[name] = None)
            found = False
        if not found:
            raise MissingExtraError(name, "export")
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "export") from None
    return onnx


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _size_hw(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:  # (C, H, W), as some configs store it
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size[0], size[1]


def _metadata(model: nn.Module, in_chans: int, hw: tuple[int, int], precision: str) -> str:
    """What a runner needs to preprocess and label: stored in the ONNX file's metadata."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # Same form as pretrained_cfg: an int for a square input.
    cfg.update(in_chans=in_chans, input_size=hw[0] if hw[0] == hw[1] else list(hw))
    cfg.update(precision=precision)
    return json.dumps(cfg, default=str)  # a Path or tuple in the cfg must not stop an export


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | tuple[int, int],
    in_chans: int = 3,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``model`` as an ONNX graph with input ``input`` (N, C, H, W) and output ``logits``.

    The batch axis is dynamic; the spatial size is fixed to ``input_size``. The model's
    ``pretrained_cfg`` (mean, std, categories ...) goes into the file's metadata under
    ``"resfit"``. ``model`` is left in the train/eval mode it had.
    """
    # The torch.export-based exporter (opset >= 18) writes its graph with onnxscript.
    onnx = _import_onnx(*(["onnxscript"] if opset >= 18 else []))
    path = Path(path)
    h, w = _size_hw(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Batch 2, not 1: torch.export specialises a size-1 dimension to a constant.
    example = torch.randn(2, in_chans, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with _atomic_target(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = {"input_names": ["input"], "output_names": ["logits"]}
            # The exporter prints progress to stdout; a library should not.
            with contextlib.redirect_stdout(io.StringIO()):
                if opset >= 18:
                    torch.onnx.export(
                        model,
                        (example,),
                        str(tmp),
                        opset_version=opset,
                        dynamo=True,
                        external_data=False,
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                        **names,
                    )
                else:
                    torch.onnx.export(
                        model,
                        (example,),
                        str(tmp),
                        opset_version=opset,
                        dynamo=False,
                        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                        **names,
                    )
            proto = onnx.load(str(tmp))
            got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            if got != opset:
                raise ExportError(f"asked for ONNX opset {opset} but the exporter wrote {got}")
            meta = proto.metadata_props.add()
            meta.key, meta.value = METADATA_KEY, _metadata(model, in_chans, (h, w), "fp32")
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.train(was_training)
    return path


def onnx_parity(model: nn.Module, onnx_path: str | os.PathLike, images: Tensor) -> float:
    """Largest absolute logit difference between ``model`` (fp32, eval) and the ONNX file."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ref = model(images.to(device, torch.float32)).float().cpu().numpy()
    finally:
        model.train(was_training)
    got = OnnxClassifier(onnx_path)(images.cpu().float().numpy())
    return float(np.abs(got - ref).max())


class _Calibration:
    """Feeds the user's image batches to ONNX Runtime's calibrator, checking each one."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray], shape: tuple) -> None:
        self.input_name, self.shape, self.count = input_name, shape, 0
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.shape:
            raise ValueError(
                f"calibration batches must be float32 N x {' x '.join(map(str, self.shape))} "
                f"(preprocessed like the model's inputs), got shape {batch.shape}"
            )
        self.count += len(batch)
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # part of the CalibrationDataReader interface; one pass is enough
        pass


def quantize_int8(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: Iterable[np.ndarray],
    *,
    symmetric: bool = False,
) -> Path:
    """Static int8 quantization of an fp32 ONNX classifier, calibrated on ``calib``.

    ``calib`` yields float32 NCHW batches preprocessed exactly like inference inputs; a few
    hundred images of the user's own data are enough (min/max ranges per tensor). Weights are
    int8 per output channel, activations uint8 (the u8 x s8 form that VNNI runs: int8
    activations ran 2.9x slower on ResNet-50 here), in QDQ format after ONNX Runtime's
    pre-processing (shape inference and graph optimisation). ``symmetric`` makes the
    activations int8 with zero point 0, the only form TensorRT takes (``--format tensorrt``).
    """
    onnx = _import_onnx("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src, out = Path(onnx_path), Path(out_path)
    proto = onnx.load(str(src))
    inp = proto.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    batches = iter(calib)
    first = next(batches, None)
    if first is None:
        raise ValueError("quantize_int8 needs calibration images; calib yielded none")
    reader_cls = type("_Reader", (_Calibration, CalibrationDataReader), {})
    reader = reader_cls(inp.name, itertools.chain([first], batches), tuple(dims[1:]))
    meta = {p.key: p.value for p in proto.metadata_props}
    with tempfile.TemporaryDirectory(prefix="resfit-quant-") as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(src), str(pre))
        with _atomic_target(out) as tmp:
            quantize_static(
                str(pre),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )
            qproto = onnx.load(str(tmp))
            cfg = json.loads(meta.get(METADATA_KEY, "{}"))
            cfg.update(precision="int8", calibration_images=reader.count)
            del qproto.metadata_props[:]
            for key, value in {**meta, METADATA_KEY: json.dumps(cfg)}.items():
                prop = qproto.metadata_props.add()
                prop.key, prop.value = key, value
            onnx.save(qproto, str(tmp))
    return out


# ---------------------------------------------------------------------------------------------
# Exporting a run folder (what `resfit export RUN` does)


def _batches(predictor: Predictor, decoded: DecodedImages, size: int = 32) -> Iterator[np.ndarray]:
    """Decoded images preprocessed as the run's model takes them, as float32 NCHW batches."""
    for i in range(0, len(decoded), size):
        x = torch.stack([predictor.transform(img) for img in decoded.images[i : i + size]])
        yield x.numpy().astype(np.float32)


def _pick(items: Sequence, limit: int, seed: int = 0) -> list:
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
    if splits.task == "multilabel":
        names = [{splits.classes[j] for j, on in enumerate(s.label) if on} for s in splits.val]
        return [Sample(s.path, tuple(int(c in n) for c in classes))
                for s, n in zip(splits.val, names, strict=True)]  # fmt: skip
    return [Sample(s.path, index[splits.classes[s.label]]) for s in splits.val]


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
        multi = cfg.get("task") == "multilabel"
        return eval_samples(val, classes, multilabel=multi)[0], f"--val {display_path(val)}"
    splits_csv = Path(run) / "splits.csv"
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
    paths = _pick(find_images([str(calib)]), limit)
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
    from .tensorrt_engine import TensorRtEngine, probe

    usable, why = probe()
    if not usable or not batches:
        return {"tensorrt_check": f"skipped: {why if not usable else 'no check images'}"}
    x = torch.from_numpy(np.concatenate(batches))
    with torch.inference_mode():
        reference = model.float().eval().cpu()(x)
    report: dict[str, Any] = {"tensorrt_check": why}
    runs = [("fp32", fp32_path), ("fp16", fp32_path)] + ([("int8", int8_path)] if int8_path else [])
    for precision, path in runs:
        engine = TensorRtEngine(path, precision, input_shape=input_shape, source="export check")
        logits = engine(x)
        report[f"tensorrt_{precision}_max_abs_logit_diff"] = float((logits - reference).abs().max())
        report[f"tensorrt_{precision}_top1_agreement"] = float(
            (logits.argmax(1) == reference.argmax(1)).float().mean()
        )
        if labels is not None and labels.ndim == 1 and len(labels) == len(x):
            y = torch.from_numpy(labels)
            change = (logits.argmax(1) == y).float().mean() - (
                reference.argmax(1) == y
            ).float().mean()
            report[f"tensorrt_{precision}_accuracy_change"] = float(change)
    return report


def _int8_accuracy(
    fp32_path: Path, int8_path: Path, batches: list[np.ndarray], y: np.ndarray
) -> dict[str, float]:
    fp32 = np.concatenate([OnnxClassifier(fp32_path)(b) for b in batches])
    q = np.concatenate([OnnxClassifier(int8_path)(b) for b in batches])
    if y.ndim == 2:  # multi-label: the check is in mAP, the agreement in per-class decisions
        from .tasks import mean_average_precision

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


def _export_openvino(
    predictor: Predictor, run, cfg: dict, classes: list[str], out_dir: Path, int8: bool, calib,
    val, calib_images: int, val_images: int,
) -> dict[str, Any]:  # fmt: skip
    """``--format openvino``: OpenVINO IR converted from the run's model (no ONNX step), the
    parity check, and with ``int8`` NNCF quantization and its accuracy change on validation
    images (as the ONNX path measures its own)."""
    from .openvino_engine import export_openvino

    samples, source = validation_samples(run, cfg, classes, val)
    checked = decode_all(_pick(samples, val_images if int8 else 64), predictor.base_size,
                         progress=False)  # fmt: skip
    batches = list(_batches(predictor, checked))
    calib_batches = None
    if int8:
        decoded = predictor.decode(_pick(find_images([str(calib)]), calib_images))
        if not len(decoded):
            raise DataError(f"--calib {display_path(calib)}: none of its images could be read")
        calib_batches = list(_batches(predictor, decoded))
    pre = predictor.preprocessing
    report = export_openvino(
        predictor.model, pre.img_size, pre.in_chans, out_dir, check=batches,
        labels=checked.labels.numpy() if len(checked) else None, calib=calib_batches,
    )  # fmt: skip
    report.update(val_source=source, val_images=len(checked), val_skipped=len(checked.skipped))
    if calib_batches:
        report["calib_images"] = sum(len(b) for b in calib_batches)
    return report


def _int8_and_engine_checks(
    predictor: Predictor, fp32_path: Path, out_dir: Path, format: str, int8: bool, calib,
    calib_images: int, checked: DecodedImages, batches: list[np.ndarray], source: str,
) -> dict[str, Any]:  # fmt: skip
    """``export_run``'s int8 file (symmetric for TensorRT) with its accuracy change on the
    validation images, and for ``--format tensorrt`` the engines' checks."""
    report: dict[str, Any] = {}
    int8_path = None
    if int8:
        # TensorRT takes int8 activations with zero point 0 only: its own file, symmetric.
        trt = format == "tensorrt"
        target = out_dir / "tensorrt" / "model.int8.onnx" if trt else out_dir / "model.int8.onnx"
        int8_path, n_calib = _quantize_run(predictor, fp32_path, target, calib, calib_images,
                                           symmetric=trt)  # fmt: skip
        report.update({"tensorrt_int8" if trt else "int8": str(int8_path), "calib_images": n_calib})
        if len(checked):
            y = checked.labels.numpy()
            # For the TensorRT file: its accuracy in ONNX Runtime on the CPU, the same QDQ graph.
            report.update(_int8_accuracy(fp32_path, int8_path, batches, y))
            log.info("int8 accuracy measured on %d images: %s", len(checked), source)
        else:
            log.warning("int8 accuracy not measured: no validation images (%s)", source)
    if format == "tensorrt":
        pre = predictor.preprocessing
        labels = checked.labels.numpy() if len(checked) else None
        report.update(_tensorrt_checks(predictor.model, fp32_path, int8_path, batches, labels,
                                       (pre.in_chans, pre.img_size, pre.img_size)))  # fmt: skip
    return report


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
    ``int8``) instead of ONNX, with the same checks (:mod:`resfit.openvino_engine`).
    ``format="tensorrt"`` writes the ONNX model and, with ``int8``, ``OUT/tensorrt/
    model.int8.onnx`` (symmetric int8, what TensorRT takes) instead of ``model.int8.onnx``,
    and on a GPU with TensorRT checks the engines built from them against PyTorch
    (``tensorrt_*`` keys; ``tensorrt_check`` says why not where they cannot run).
    ``format="triton"`` also writes a Triton model repository, ``OUT/triton/NAME`` (``name``
    defaults to the run folder's name), with dynamic batching up to ``max_batch`` after at most
    ``max_queue_delay_us``; see :mod:`resfit.triton`."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    if int8 and not calib:
        raise ConfigError(
            "--int8 needs --calib DATA: a few hundred of your own images to calibrate on"
        )
    cfg, classes = load_run(run)
    out_dir = Path(out or Path(run) / "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_run(run, device="cpu", precision="fp32", engine="torch")
    if format == "openvino":
        report = _export_openvino(predictor, run, cfg, classes, out_dir, int8, calib, val,
                                  calib_images, val_images)  # fmt: skip
        (out_dir / "export.json").write_text(json.dumps(report, indent=2))
        return report
    fp32_path = _export_fp32(predictor, classes, out_dir, opset)
    report: dict[str, Any] = {"onnx": str(fp32_path), "opset": opset}

    samples, source = validation_samples(run, cfg, classes, val)
    # Decoded with their labels: a file that cannot be read drops out with its label. Without
    # int8 only the parity check needs images, and 64 are enough for it.
    limit = val_images if int8 else 64
    checked = decode_all(_pick(samples, limit), predictor.base_size, progress=False)
    report.update(val_source=source, val_images=len(checked), val_skipped=len(checked.skipped))
    batches = list(_batches(predictor, checked))
    if not batches and calib:
        batches = list(_batches(predictor, predictor.decode(_pick(find_images([str(calib)]), 64))))
    if batches:
        images = torch.from_numpy(np.concatenate(batches)[:64])
        report["max_abs_logit_diff"] = onnx_parity(predictor.model, fp32_path, images)
    report.update(_int8_and_engine_checks(predictor, fp32_path, out_dir, format, int8, calib,
                                          calib_images, checked, batches, source))  # fmt: skip
    if format == "triton":
        from .triton import write_triton_repository

        model_name = name or Path(run).resolve().name
        triton_dir = write_triton_repository(
            fp32_path, out_dir / "triton", model_name, classes=classes,
            max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
        )  # fmt: skip
        report["triton"] = str(triton_dir)
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    return report

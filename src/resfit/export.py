"""Ship a classifier as ONNX: export, parity check, int8 quantization, and a small runner.

ONNX Runtime is the CPU engine: on the project's AVX-512 VNNI Xeon (no AVX512_BF16/AMX), static
int8 is the one precision faster than fp32 (``bench/inference.py`` prints the figures).
``onnx``/``onnxruntime`` are optional (``pip install 'resfit[export]'``) and imported only
inside the functions that need them.

Every file is written to a temporary name beside the target and renamed into place, so an
interrupted export never leaves a truncated model where a good one was expected.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "OnnxClassifier",
    "export_onnx",
    "onnx_parity",
    "quantize_int8",
]

# torch's exporter (torch.export based) emits opset 18 natively; it cannot lower these graphs to
# 17 (its Pad and ReduceMean version adapters fail, measured with torch 2.14), so an older opset
# goes through the TorchScript exporter instead. Opset 18 needs ONNX Runtime >= 1.14.
DEFAULT_OPSET = 18
METADATA_KEY = "resfit"


class ExportError(RuntimeError):
    """Export or quantization cannot proceed; the message says what to do."""


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export and the ONNX engine need the optional packages onnx, onnxruntime and "
            f"onnxscript ({e.name} is missing): pip install 'resfit[export]'"
        ) from None
    return onnx, onnxruntime


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
    onnx, _ = _import_onnx()
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
) -> Path:
    """Static int8 quantization of an fp32 ONNX classifier, calibrated on ``calib``.

    ``calib`` yields float32 NCHW batches preprocessed exactly like inference inputs; a few
    hundred images of the user's own data are enough (min/max ranges per tensor). Weights are
    int8 per output channel, activations uint8 (the u8 x s8 form that VNNI runs: int8
    activations ran 2.9x slower on ResNet-50 here), in QDQ format after ONNX Runtime's
    pre-processing (shape inference and graph optimisation).
    """
    onnx, ort = _import_onnx()
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
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
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


class OnnxClassifier:
    """Run an exported classifier with ONNX Runtime on the CPU.

    ``threads`` sets the intra-op threads (default: ONNX Runtime's, one per physical core).
    ``metadata`` is the ``pretrained_cfg`` stored at export (mean, std, input_size,
    categories, precision); ``precision`` is ``"fp32"`` or ``"int8"``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        _, ort = _import_onnx()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=["CPUExecutionProvider"]
        )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: list[int | str | None] = list(inp.shape)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = json.loads(meta.get(METADATA_KEY, "{}"))
        self.precision: str = self.metadata.get("precision", "fp32")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 NCHW batch preprocessed like training inputs."""
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        want = self.input_shape[1:]
        if x.ndim != 4 or any(
            isinstance(w, int) and w != g for w, g in zip(want, x.shape[1:], strict=False)
        ):
            raise ValueError(
                f"{self.path.name} takes N x {' x '.join(map(str, want))} float32 images, "
                f"got shape {x.shape}"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, precision={self.precision!r})"


# ---------------------------------------------------------------------------------------------
# Exporting a run folder (what `resfit export RUN` does)


def _preprocessed_batches(predictor, paths: list, batch_size: int = 32) -> Iterator[np.ndarray]:
    decoded = predictor.decode(paths)
    for i in range(0, len(decoded), batch_size):
        x = torch.stack([predictor.transform(img) for img in decoded.images[i : i + batch_size]])
        yield x.numpy().astype(np.float32)


def _labelled(data: str | os.PathLike, classes: list[str], limit: int, seed: int = 0) -> list:
    """Up to ``limit`` labelled samples of ``data``, drawn evenly at random."""
    from .data import eval_samples

    samples, _ = eval_samples(data, classes)
    rng = np.random.default_rng(seed)
    if len(samples) > limit:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), limit, replace=False))]
    return samples


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
) -> dict:
    """Export a run to ONNX (``RUN/export/model.onnx``), check it against PyTorch on real images,
    and with ``int8`` quantize it on the user's calibration images and measure the accuracy
    change on validation images. Returns (and writes to export.json) what was measured."""
    from .inference import Predictor, load_run

    cfg, classes = load_run(run)
    out_dir = Path(out or Path(run) / "export")
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_run(run, device="cpu", precision="fp32")
    model = predictor.model
    model.pretrained_cfg = {
        "mean": cfg["mean"],
        "std": cfg["std"],
        "input_size": cfg["img_size"],
        "categories": classes,
    }
    fp32_path = export_onnx(
        model,
        out_dir / "model.onnx",
        input_size=cfg["img_size"],
        in_chans=cfg.get("in_chans", 3),
        opset=opset,
    )
    report: dict[str, Any] = {"onnx": str(fp32_path), "opset": opset}

    val = val or (cfg["data"] if Path(cfg.get("data", "")).exists() else None)
    val_samples = _labelled(val, classes, val_images) if val else []
    check = val_samples[:64] or None
    if check is None and calib:
        check = _labelled(calib, classes, 64)
    if check:
        images = torch.from_numpy(
            np.concatenate(list(_preprocessed_batches(predictor, [s.path for s in check])))
        )
        report["max_abs_logit_diff"] = onnx_parity(model, fp32_path, images)
    if int8:
        if not calib:
            raise ExportError(
                "--int8 needs --calib DATA: a few hundred of your own images to calibrate on"
            )
        from .data import find_images

        calib_paths = find_images([str(calib)])
        rng = np.random.default_rng(0)
        if len(calib_paths) > calib_images:
            calib_paths = [
                calib_paths[i]
                for i in sorted(rng.choice(len(calib_paths), calib_images, replace=False))
            ]
        int8_path = quantize_int8(
            fp32_path, out_dir / "model.int8.onnx", _preprocessed_batches(predictor, calib_paths)
        )
        report.update(int8=str(int8_path), calib_images=len(calib_paths))
        if val_samples:
            y = np.array([s.label for s in val_samples])
            batches = list(_preprocessed_batches(predictor, [s.path for s in val_samples]))
            fp32 = np.concatenate([OnnxClassifier(fp32_path)(b) for b in batches]).argmax(1)
            q = np.concatenate([OnnxClassifier(int8_path)(b) for b in batches]).argmax(1)
            report.update(
                val_images=len(y),
                fp32_accuracy=float((fp32 == y).mean()),
                int8_accuracy=float((q == y).mean()),
                int8_accuracy_change=float((q == y).mean() - (fp32 == y).mean()),
                top1_agreement=float((q == fp32).mean()),
            )
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    return report

"""ONNX export of a model: the fp32 graph with its metadata, the parity check against PyTorch,
and static int8 quantization (QDQ) calibrated on real images. ``onnx``/``onnxruntime`` are the
``export`` extra, imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib.util
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

from ..core.atomic import atomic_path
from ..core.errors import ExportError, MissingExtraError
from ..inference.engines import ONNX_METADATA_KEY, OnnxClassifier

__all__ = ["DEFAULT_OPSET", "export_int8_graph", "export_onnx", "onnx_parity", "quantize_int8"]

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
    with atomic_path(path) as tmp:
        yield tmp


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


def _torch_export(model: nn.Module, example: Tensor, tmp: Path, opset: int) -> None:
    """``torch.onnx.export`` with a dynamic batch axis: the torch.export-based exporter from
    opset 18, the TorchScript one below."""
    names = {"input_names": ["input"], "output_names": ["logits"]}
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
            # The exporter prints progress to stdout; a library should not.
            with contextlib.redirect_stdout(io.StringIO()):
                _torch_export(model, example, tmp, opset)
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
            _copy_int8_metadata(onnx, tmp, meta, reader.count)
    return out


def export_int8_graph(graph: nn.Module, fp32_path: str | os.PathLike | None,
                      out_path: str | os.PathLike, example: Tensor) -> Path:  # fmt: skip
    """Write an int8 graph that PyTorch already quantized (the converted graph of a QAT run,
    :func:`resfit.models.qat.convert_qat`) as ONNX QDQ, as it is: no calibration. It gets the
    fp32 file's metadata, its resfit entry saying int8 from quantization-aware training."""
    onnx = _import_onnx("onnxruntime", "onnxscript")
    out = Path(out_path)
    meta = {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props} if fp32_path else {}
    with _atomic_target(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            _torch_export(graph, example, tmp, DEFAULT_OPSET)
        _copy_int8_metadata(onnx, tmp, meta, 0, quantization="qat")
    return out


def _copy_int8_metadata(
    onnx: Any, path: Path, meta: dict[str, str], images: int, quantization: str = "static"
) -> None:
    """Give the quantized file at ``path`` the fp32 file's metadata ``meta``, its resfit entry
    saying int8, how (post-training ``static`` or ``qat``) and how many images calibrated it."""
    qproto = onnx.load(str(path))
    cfg = json.loads(meta.get(METADATA_KEY, "{}"))
    cfg.update(precision="int8", calibration_images=images, quantization=quantization)
    del qproto.metadata_props[:]
    for key, value in {**meta, METADATA_KEY: json.dumps(cfg)}.items():
        prop = qproto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(qproto, str(path))

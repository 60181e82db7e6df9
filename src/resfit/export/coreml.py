"""CoreML ``.mlpackage`` (ML program) for iPhones, iPads and Macs, converted by coremltools from
the exported PyTorch graph, fp32 (compute precision FLOAT32, so it matches PyTorch's numbers).

CoreML runs only on Apple systems: here the package is converted and its structure checked
(the spec loads, one image input of the run's shape, one output of the run's classes); no
prediction, speed or accuracy is ever measured or claimed for it. Optional: ``resfit[edge]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_dir
from ..core.errors import DataError, MissingExtraError

__all__ = ["check_coreml", "export_coreml"]


def _coremltools() -> Any:
    try:
        import coremltools
    except ImportError:
        raise MissingExtraError("coremltools", "edge") from None
    return coremltools


def export_coreml(model: nn.Module, example: torch.Tensor, target: Path) -> Path:
    """Write ``model`` as an fp32 ML program at ``target`` (a folder)."""
    ct = _coremltools()
    model = model.float().eval().cpu()
    program = torch.export.export(model, (example[:1],)).run_decompositions({})
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        ml = ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                        minimum_deployment_target=ct.target.iOS17)  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp, tempfile.TemporaryDirectory(dir=target.parent) as staging:
        # coremltools writes the package folder itself, and only under a .mlpackage name.
        package = Path(staging) / "model.mlpackage"
        ml.save(str(package))
        tmp.rmdir()
        os.rename(package, tmp)
    return target


def check_coreml(target: Path, input_shape: tuple[int, ...], classes: int) -> dict[str, Any]:
    """The package's structure: its spec loads, one float input of ``input_shape``, one output
    of ``classes`` values. Raises a :class:`DataError` naming what differs."""
    ct = _coremltools()
    spec = ct.utils.load_spec(str(target))
    inputs, outputs = spec.description.input, spec.description.output
    if len(inputs) != 1 or len(outputs) != 1:
        raise DataError(f"{target}: {len(inputs)} inputs and {len(outputs)} outputs, not 1 and 1")
    shape = tuple(inputs[0].type.multiArrayType.shape)
    out_shape = tuple(outputs[0].type.multiArrayType.shape)
    if shape != tuple(input_shape):
        raise DataError(f"{target}: input shape {shape}, not the run's {tuple(input_shape)}")
    if out_shape and out_shape[-1] != classes:
        raise DataError(f"{target}: output shape {out_shape}, not {classes} classes")
    return {"coreml_spec_version": spec.specificationVersion, "coreml_input": list(shape),
            "coreml_output": list(out_shape), "coreml_ops_checked": "structure only"}  # fmt: skip

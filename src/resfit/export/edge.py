"""The small-device formats' common export step: convert (fp32, and int8 on calibration
images), then run each file in its own runtime on the validation images and compare it with
the PyTorch model it came from: file size, largest logit difference, top-1 agreement and, with
class-index labels, the accuracy change. CoreML, which runs only on Apple systems, is checked
for structure only.

The converters are one module each (:mod:`.executorch`, :mod:`.litert`, :mod:`.ncnn`,
:mod:`.coreml`); the runtimes live in :mod:`resfit.inference.edge`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..inference.edge import edge_runner
from ..runs import EDGE_FILES

log = logging.getLogger("resfit")

__all__ = ["EDGE_FORMATS", "compare", "export_edge", "file_size"]

EDGE_FORMATS = ("executorch", "litert", "ncnn", "coreml")
# Why a precision is not offered, for the one-line error of `--int8`.
NO_INT8 = {
    "ncnn": "NCNN quantizes with its ncnn2table/ncnn2int8 tools, which its PyPI packages do not "
    "ship: export fp32 here and quantize with the tools built from NCNN's source",
    "coreml": "CoreML runs only on Apple systems, so an int8 CoreML model could not be checked "
    "here: export fp32 and quantize with coremltools on a Mac",
}


def file_size(path: Path) -> int:
    """Bytes on disk of an exported model: a file, a ``.param`` with its ``.bin``, or a package
    folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    extra = path.with_suffix(".bin") if path.suffix == ".param" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.is_file() else 0)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """How an exported model's logits differ from PyTorch's on the same images."""
    out = {
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
    }
    if labels is not None and labels.ndim == 1 and len(labels) == len(logits):  # class indices
        acc, ref = (logits.argmax(1) == labels).mean(), (reference.argmax(1) == labels).mean()
        out.update(accuracy=float(acc), accuracy_change=float(acc - ref))
    return out


def _convert(format: str, model: nn.Module, example: torch.Tensor, target: Path,
             calib: Sequence[torch.Tensor] | None) -> Path:  # fmt: skip
    if format == "executorch":
        from .executorch import export_executorch

        return export_executorch(model, example, target, calib)
    if format == "litert":
        from .litert import export_litert

        return export_litert(model, example, target, calib)
    if format == "ncnn":
        from .ncnn import export_ncnn

        return export_ncnn(model, example, target)
    from .coreml import export_coreml

    return export_coreml(model, example, target)


def check_edge_options(format: str, int8: bool) -> None:
    """A one-line error before any work for a precision a format does not offer here."""
    if int8 and (format, "int8") not in EDGE_FILES:
        raise ConfigError(f"--format {format} --int8 is not offered: {NO_INT8[format]}")


def export_edge(format: str, model: nn.Module, out_dir: Path, batches: list[np.ndarray],
                labels: np.ndarray | None, calib: list[np.ndarray] | None,
                input_shape: tuple[int, int, int], classes: int) -> dict[str, Any]:  # fmt: skip
    """Write ``out_dir/<file>`` (and the int8 file with ``calib``) and measure each against
    ``model`` on ``batches``; the report ``export.json`` gets."""
    check_edge_options(format, calib is not None)
    model = model.float().eval().cpu()
    example = torch.from_numpy(batches[0][:1]) if batches else torch.zeros(1, *input_shape)
    x = np.concatenate(batches) if batches else np.zeros((0, *input_shape), np.float32)
    with torch.inference_mode():
        # Batch by batch: the whole validation set at once can be GBs of activations.
        reference = (
            np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches])
            if len(x)
            else None
        )
    report: dict[str, Any] = {"format": format}
    precisions = ["fp32"] + (["int8"] if calib is not None else [])
    for precision in precisions:
        key = "" if precision == "fp32" else "int8_"
        started = time.perf_counter()
        calib_t = [torch.from_numpy(b) for b in calib] if precision == "int8" and calib else None
        path = _convert(format, model, example, out_dir / EDGE_FILES[(format, precision)], calib_t)
        report[f"{format}{'' if precision == 'fp32' else '_int8'}"] = str(path)
        report[f"{key}size_bytes"] = file_size(path)
        report[f"{key}convert_s"] = round(time.perf_counter() - started, 2)
        if format == "coreml":
            from .coreml import check_coreml

            report.update(check_coreml(path, (1, *input_shape), classes))
            report["coreml_note"] = "runs only on Apple systems: converted, structure checked"
            continue
        if reference is None:
            log.warning("%s %s not checked: no validation images", format, precision)
            continue
        logits = edge_runner(format, path)(x)
        report.update({f"{key}{k}": v for k, v in compare(logits, reference, labels).items()})
    if reference is not None and labels is not None and labels.ndim == 1:
        report["pytorch_accuracy"] = float((reference.argmax(1) == labels).mean())
    return report

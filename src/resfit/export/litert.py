"""LiteRT (TensorFlow Lite) ``.tflite`` models for Android, microcontroller-class boards and
the Raspberry Pi, converted straight from PyTorch by ``litert-torch`` (no ONNX or TensorFlow
step): fp32, and int8 through its PT2E quantizer (symmetric per-channel weights, static int8
activations calibrated on the user's images, int8 input and output: the runner (de)quantizes
them with the scales in the file). Static batch of 1. Optional: ``pip install 'resfit[edge]'``.

Why litert-torch and not onnx2tf: onnx2tf needs TensorFlow (a second framework, ~600 MB) and
transposes every layer from NCHW to NHWC by rules; litert-torch lowers the exported PyTorch
graph itself, and its fp32 output matched PyTorch to 2e-6 on the CIFAR ResNets
(docs/guide/small-devices.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.atomic import atomic_path
from ..core.errors import MissingExtraError
from .executorch import quantize_pt2e

__all__ = ["export_litert"]


def export_litert(model: nn.Module, example: torch.Tensor, target: Path,
                  calib: Sequence[torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write ``model`` as a LiteRT flatbuffer at ``target``; fully int8 when ``calib``
    (batches of preprocessed images) is given."""
    try:
        import litert_torch
    except ImportError:
        raise MissingExtraError("litert-torch", "edge") from None
    model = model.float().eval().cpu()
    example = example[:1]
    quant_config = None
    if calib is not None:
        from litert_torch.quantize.pt2e_quantizer import (
            PT2EQuantizer,
            get_symmetric_quantization_config,
        )
        from litert_torch.quantize.quant_config import QuantConfig

        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        quantizer = PT2EQuantizer().set_global(config)
        model = quantize_pt2e(model, example, quantizer, calib, fold=False)
        quant_config = QuantConfig(pt2e_quantizer=quantizer)
    converted = litert_torch.convert(model, (example,), quant_config=quant_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        converted.export(str(tmp))
    return target

"""ExecuTorch ``.pte`` programs for phones and boards, lowered to the XNNPACK backend (the
ExecuTorch CPU backend on Arm and x86): fp32, and int8 through the PT2E flow with ExecuTorch's
XNNPACK quantizer (symmetric, per-channel weights, static activations calibrated on the user's
images). The program holds a static batch of 1. ``executorch`` is optional (``resfit[edge]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.atomic import atomic_write_bytes
from ..core.errors import MissingExtraError

__all__ = ["export_executorch", "quantize_pt2e"]


def quantize_pt2e(model: nn.Module, example: torch.Tensor, quantizer: object,
                  calib: Sequence[torch.Tensor], fold: bool = True) -> torch.fx.GraphModule:  # fmt: skip
    """``model`` exported, observed on ``calib`` (single images, the program's batch of 1) and
    converted to quantize/dequantize pairs by ``quantizer`` (torchao's PT2E flow)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calib:
            for i in range(len(x)):
                prepared(x[i : i + 1])
    return convert_pt2e(prepared, fold_quantize=fold)


def export_executorch(model: nn.Module, example: torch.Tensor, target: Path,
                      calib: Sequence[torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write ``model`` as an ExecuTorch program delegated to XNNPACK at ``target``; int8 when
    ``calib`` (batches of preprocessed images) is given."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise MissingExtraError("executorch", "edge") from None
    model = model.float().eval().cpu()
    example = example[:1]
    if calib is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        config = get_symmetric_quantization_config(is_per_channel=True)
        model = quantize_pt2e(model, example, XNNPACKQuantizer().set_global(config), calib)
    program = torch.export.export(model, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, lowered.to_executorch().buffer)
    return target

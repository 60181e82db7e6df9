"""Quantization-aware training (QAT) with PyTorch's PT2E flow (``torchao.quantization.pt2e``).

:func:`prepare_qat` turns a network into a graph with fake-quantized weights (int8, symmetric,
per output channel) and activations (int8, per tensor), BatchNorm folding simulated, that
**shares the network's parameters and buffers**: the optimizer keeps stepping the same tensors,
and the plain network (what validation scores and ``model.safetensors`` keeps) holds the
QAT-trained weights. :func:`convert_qat` rebuilds that graph from a saved state (its learned
ranges included) and converts it into real quantize/dequantize ops, which ``torch.onnx``
writes as an ONNX QDQ graph: ``resfit export --int8`` uses it as is, no calibration.

Why PT2E and not NNCF (both measured on this 2-core Zen 4, torch 2.14, ResNet-20 CIFAR):
NNCF 3.4's PyTorch QAT compiles a C++ extension at its first fake-quantized step, which did not
finish within NNCF's 60 s limit here (``ExtensionLoaderTimeoutException``); PT2E prepared the
network in 6.5 s, its QAT step ran at the fp32 step's speed, and its converted graph exported
to ONNX QDQ that ONNX Runtime runs. torch 2.14 moved PT2E out of ``torch.ao`` into torchao
(the ``qat`` extra). The quantizer is ExecuTorch's XNNPACK one when installed, else torchao's
copy of it (the same configuration).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import MissingExtraError

__all__ = ["convert_qat", "prepare_qat", "qat_available"]


def qat_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def _quantizer() -> Any:
    if not qat_available():
        raise MissingExtraError("torchao", "qat")
    try:  # ExecuTorch's XNNPACK quantizer, where the edge extra installed it
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError:
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    return XNNPACKQuantizer().set_global(config)


def prepare_qat(model: nn.Module, example: Tensor) -> nn.Module:
    """``model`` (in train mode) as a fake-quantized training graph sharing its parameters and
    buffers; its batch axis is dynamic. Call ``.train()``/``.eval()`` on it as on a module."""
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    quantizer = _quantizer()
    was_training = model.training
    model.train()
    batch = torch.export.Dim("batch", min=2)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    model.train(was_training)
    prepared = prepare_qat_pt2e(graph, quantizer)
    pt2e.allow_exported_model_train_eval(prepared)  # .train()/.eval() switch BN's behaviour
    return prepared


def convert_qat(model: nn.Module, state: dict[str, Tensor], example: Tensor) -> nn.Module:
    """The int8 graph of a QAT run: ``model`` (the architecture, any weights) prepared as in
    training, given the saved QAT ``state`` (weights and learned ranges), converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepare_qat(model, example)
    missing, unexpected = prepared.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ValueError(f"the QAT state does not fit this network: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")  # fmt: skip
    prepared.eval()
    with _conv2d_folding():
        return convert_pt2e(prepared)


@contextlib.contextmanager
def _conv2d_folding() -> Iterator[None]:
    """``convert_pt2e`` folding the QAT conv+BN pairs of conv2d alone. torchao tries conv1d,
    conv2d and both transposed convolutions, exporting 24 pattern graphs for each: 3/4 of a
    ResNet's conversion time spent on patterns a ResNet has none of (25 s on a 2-core Zen 4).
    Where any BN is left after conv2d, or torchao's internals moved, its own fold runs."""
    try:
        from torchao.quantization.pt2e import qat_utils as q
        from torchao.quantization.pt2e import quantize_pt2e as qp

        full, helper, is_bn = qp._fold_conv_bn_qat, q._fold_conv_bn_qat_helper, q._is_bn_node
    except (ImportError, AttributeError):
        yield
        return
    example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *torch.randn(4, 1))

    def conv2d_only(m: Any) -> Any:
        if any(is_bn(n) for n in m.graph.nodes):
            m = helper(m, F.conv2d, example, is_cuda=False)
        if any(is_bn(n) for n in m.graph.nodes):
            return full(m)
        _drop_bn_counters(m)  # what torchao's fold ends with
        return m

    qp._fold_conv_bn_qat = conv2d_only
    try:
        yield
    finally:
        qp._fold_conv_bn_qat = full


def _drop_bn_counters(m: Any) -> None:
    """Remove BN's in-place ``num_batches_tracked += 1`` (a buffer update that an inference
    graph must not keep), as torchao's own fold does."""
    for node in list(m.graph.nodes):
        stack = [v[1] for v in (node.meta.get("nn_module_stack") or {}).values()]
        if (node.target == torch.ops.aten.add_.Tensor and node.args[0].op == "get_attr"
                and node.args[1] == 1 and "torch.nn.modules.batchnorm.BatchNorm2d" in stack):  # fmt: skip
            m.graph.erase_node(node)
    m.graph.eliminate_dead_code()
    m.recompile()

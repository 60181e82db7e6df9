"""NCNN ``.param``/``.bin`` pairs (Tencent's runtime for Android, iOS and Arm boards), written by
pnnx, NCNN's own PyTorch converter (TorchScript trace → pnnx graph → NCNN layers, fp32 weights).

The CIFAR ResNets' option-A shortcut subsamples with a strided slice (``x[:, :, ::2, ::2]``),
which NCNN has no layer for (pnnx leaves a ``Tensor.slice`` NCNN cannot load); the copy traced
here takes every second pixel with a 1x1 max-pool of the same stride instead: the same values,
in a layer NCNN has.

int8: NCNN quantizes with its ``ncnn2table`` and ``ncnn2int8`` command-line tools, which the
``ncnn`` and ``pnnx`` packages on PyPI do not ship; so NCNN here is fp32 only (build the tools
from NCNN's source to quantize the fp32 pair). Optional: ``pip install 'resfit[edge]'``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.atomic import atomic_commit, temp_path
from ..core.errors import MissingExtraError
from ..models.resnet import ZeroPadShortcut

__all__ = ["export_ncnn"]


class _PooledShortcut(nn.Module):
    """:class:`ZeroPadShortcut` with its subsampling as a 1x1 max-pool (NCNN's Pooling)."""

    def __init__(self, shortcut: ZeroPadShortcut) -> None:
        super().__init__()
        self.stride = shortcut.stride
        self.pad_before, self.pad_after = shortcut.pad_before, shortcut.pad_after

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=1, stride=self.stride)
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _ncnn_friendly(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every strided-slice shortcut as a pooling layer."""
    model = copy.deepcopy(model).float().eval().cpu()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ZeroPadShortcut):
                setattr(module, child_name, _PooledShortcut(child))
        del name
    return model


def export_ncnn(model: nn.Module, example: torch.Tensor, target: Path) -> Path:
    """Write ``model`` as ``target`` (``.param``) and the ``.bin`` beside it, fp32."""
    try:
        import pnnx
    except ImportError:
        raise MissingExtraError("pnnx", "edge") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = target.with_suffix(".bin")
    param_tmp, bin_tmp = temp_path(target), temp_path(weights)
    with tempfile.TemporaryDirectory(prefix="resfit-pnnx-") as work:
        w = Path(work)
        # pnnx writes its intermediate files (TorchScript, pnnx graph, python) beside ptpath.
        with contextlib.redirect_stdout(io.StringIO()):
            pnnx.export(_ncnn_friendly(model), str(w / "model.pt"), (example[:1],),
                        ncnnparam=str(param_tmp), ncnnbin=str(bin_tmp), fp16=False,
                        pnnxparam=str(w / "m.pnnx.param"), pnnxbin=str(w / "m.pnnx.bin"),
                        pnnxpy=str(w / "m_pnnx.py"), pnnxonnx=str(w / "m.pnnx.onnx"),
                        ncnnpy=str(w / "m_ncnn.py"))  # fmt: skip
    try:
        atomic_commit(bin_tmp, weights)  # the weights first: a new .param never meets old ones
        atomic_commit(param_tmp, target)
    finally:
        param_tmp.unlink(missing_ok=True)
        bin_tmp.unlink(missing_ok=True)
    return target

"""``--qat N``: quantization-aware training for the last N epochs of a run (train or distill).

From epoch ``epochs - N`` the step trains the fake-quantized graph of
:func:`resfit.models.qat.prepare_qat` instead of the network. That graph shares the network's
parameters and buffers, so nothing else changes: the optimizer, the schedule, the teacher of a
distillation, validation and ``model.safetensors`` (plain fp32, loadable as ever) all see the
same tensors. After each QAT epoch the graph's state (weights and learned int8 ranges) is
written to ``RUN/model.qat.safetensors`` when the epoch improved the validation score (and
after every QAT epoch until one does); ``resfit export --int8`` converts it as is instead of
calibrating after training. The QAT epochs run in fp32: fake quantization under bf16 autocast
would round the ranges it learns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError, TrainingError
from ..models.qat import prepare_qat, qat_available
from ..runs import write_qat_model
from .loop import Callback, Loop

log = logging.getLogger("resfit")

__all__ = ["QuantizationAware"]


class QuantizationAware(Callback):
    """Switches the step to the fake-quantized graph for the last ``qat_epochs`` epochs."""

    order = 90  # after BestModel (80): after_epoch knows whether the epoch improved

    def __init__(self, qat_epochs: int, epochs: int, run: Path, main: bool) -> None:
        self.first = max(0, epochs - qat_epochs)
        self.run, self.main = run, main
        self.graph: nn.Module | None = None
        self.kept_improved = False
        self._plain: tuple[nn.Module, str] | None = None

    def before_fit(self, loop: Loop) -> None:
        if not qat_available():
            from ..core.errors import MissingExtraError

            raise MissingExtraError("torchao", "qat")  # now, not after the fp32 epochs
        if loop.dist.world > 1:
            raise ConfigError("--qat runs in one process; train without torchrun")

    def before_epoch(self, loop: Loop) -> None:
        if loop.epoch < self.first or self.graph is not None:
            return
        if loop.features is not None:
            raise TrainingError("--qat trains the whole network on images: give --cache off")
        x, _ = loop.data.train[0]
        example = torch.randn(2, *x.shape, device=loop.step.device)
        if loop.step.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        self.graph = prepare_qat(loop.model, example)
        self._plain = (loop.net, loop.step.precision)
        loop.net, loop.step.precision = self.graph, "fp32"
        log.info("quantization-aware training (int8, PT2E) from epoch %d of %d", loop.epoch + 1,
                 loop.epochs)  # fmt: skip

    def before_train(self, loop: Loop) -> None:
        if self.graph is not None:
            self.graph.train()

    def after_epoch(self, loop: Loop) -> None:
        if self.graph is None or not self.main:
            return
        if loop.improved or not self.kept_improved:
            state = self.graph.state_dict()
            if loop.try_write(self.run, lambda: write_qat_model(self.run, state)):
                self.kept_improved |= loop.improved

    def after_fit(self, loop: Loop) -> None:
        if self._plain is not None:
            loop.net, loop.step.precision = self._plain
            self._plain = None

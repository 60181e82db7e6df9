"""``--qat N``: quantization-aware training for the last N epochs of a run (train or distill).

From epoch ``epochs - N`` the step trains the fake-quantized graph of
:func:`resfit.models.qat.prepare_qat` instead of the network. That graph shares the network's
parameters and buffers, so nothing else changes: the optimizer, the schedule, the teacher of a
distillation, validation and ``model.safetensors`` (plain fp32, loadable as ever) all see the
same tensors. After a QAT epoch that improved the validation score, the epoch
``model.safetensors`` keeps, the graph's state (weights and learned int8 ranges) is written to
``RUN/model.qat.safetensors`` with that epoch in its metadata; ``resfit export --int8`` converts
it as is instead of calibrating after training. Where no QAT epoch beats the fp32 epochs
before them there is no such state (a warning says so) and export calibrates; a state of
another epoch than the model's is refused (:func:`resfit.runs.load_qat_model`). The QAT epochs run in fp32: fake quantization under bf16 autocast
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
from .callbacks import BestModel
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
        self.kept_epoch: int | None = None  # the epoch of the QAT state written (the best)
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
        # Only an epoch that improved: model.safetensors keeps the best epoch's weights, and
        # the QAT state must be of the same epoch (an int8 of other weights is another model).
        if self.graph is None or not self.main or not loop.improved:
            return
        state, epoch = self.graph.state_dict(), loop.epoch + 1
        if loop.try_write(self.run, lambda: write_qat_model(self.run, state, epoch)):
            self.kept_epoch = epoch

    def after_fit(self, loop: Loop) -> None:
        if self._plain is not None:
            loop.net, loop.step.precision = self._plain
            self._plain = None
            best = loop.callback(BestModel)
            if self.main and best is not None and best.best_epoch <= self.first:
                log.warning(
                    "--qat: no quantization-aware epoch beat epoch %d (fp32), which "
                    "model.safetensors keeps: no int8 state from training; resfit export "
                    "--int8 calibrates it (--calib DATA)", best.best_epoch,
                )  # fmt: skip

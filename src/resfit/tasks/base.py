"""The :class:`Task` interface: what the loop, evaluation and inference ask of a kind of label
(the loss, the metrics, the post-processing of logits into probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float, class_weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy for hard labels or MixUp/CutMix soft labels, with optional class weights."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, weight=class_weight, label_smoothing=smoothing)
    k = logits.shape[1]
    target = target * (1 - smoothing) + smoothing / k
    if class_weight is not None:
        target = target * class_weight
    return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()


class Task:
    """The interface the loop, evaluation and inference use."""

    name: ClassVar[str]
    monitor: ClassVar[str]  # the validation metric that picks the best epoch (higher is better)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def count_correct(self, logits: Tensor, target: Tensor) -> float:
        """How many of a training batch's (hard) targets the logits get right."""
        raise NotImplementedError

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        """``val_loss`` and the monitored metric (and others) for validation logits."""
        raise NotImplementedError

    def probabilities(self, logits: Tensor, temperature: float | Sequence[float] = 1.0) -> Tensor:
        raise NotImplementedError

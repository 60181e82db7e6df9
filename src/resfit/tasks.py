"""Tasks: what the network's outputs mean, how they are scored and turned into answers.

A task owns the loss, the metrics the loop logs and monitors, the post-processing of logits
into probabilities, and the calibration fitted on validation. The training loop, evaluation and
inference ask the task, so a new kind of label (several per image) is a new task, not edits
across the code.

Today: :class:`SingleLabel` (one class per image: softmax, cross-entropy, argmax accuracy).

Add a task: subclass :class:`Task` and implement its methods; training builds it in
``training.run._task`` and inference in ``inference._TASK``.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def probabilities(self, logits: Tensor, temperature: float = 1.0) -> Tensor:
        raise NotImplementedError


@dataclass
class SingleLabel(Task):
    """One class per image: softmax outputs, (smoothed, optionally class-weighted)
    cross-entropy, top-1 accuracy."""

    name: ClassVar[str] = "single_label"
    monitor: ClassVar[str] = "val_acc"
    label_smoothing: float = 0.0
    class_weight: Tensor | None = None

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return soft_cross_entropy(logits, target, self.label_smoothing, self.class_weight)

    def count_correct(self, logits: Tensor, target: Tensor) -> float:
        return float((logits.argmax(1).cpu() == target).sum().item())

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        return {
            "val_loss": F.cross_entropy(logits, target).item(),
            "val_acc": (logits.argmax(1) == target).float().mean().item(),
        }

    def probabilities(self, logits: Tensor, temperature: float = 1.0) -> Tensor:
        return torch.softmax(logits.float() / temperature, dim=1)

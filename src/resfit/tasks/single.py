"""One class per image: softmax outputs, (smoothed, optionally class-weighted) cross-entropy,
top-1 accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Task, soft_cross_entropy


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

"""One class per image: softmax outputs, (smoothed, optionally class-weighted) cross-entropy,
top-1 accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.labels import CLASS_INDEX, LabelCoding
from .base import Answer, Task, soft_cross_entropy

if TYPE_CHECKING:
    from ..core.config import TrainConfig


@dataclass
class SingleLabel(Task):
    """One class per image: softmax outputs, (smoothed, optionally class-weighted)
    cross-entropy, top-1 accuracy."""

    name: ClassVar[str] = "single_label"
    monitor: ClassVar[str] = "val_acc"
    metric_label: ClassVar[str] = "accuracy"
    coding: ClassVar[LabelCoding] = CLASS_INDEX
    label_smoothing: float = 0.0
    class_weight: Tensor | None = None

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, all_labels: Tensor, labels: Tensor, device: torch.device
    ) -> tuple[Task, Tensor | None]:
        """Class weights (``--balance weights``) or draw weights (``--balance sampler``)."""
        counts = torch.bincount(all_labels, minlength=len(cfg.classes)).float()
        class_weight = None
        if cfg.data.balance == "weights":
            # Inverse-frequency weights, normalised so the average image weighs 1.
            class_weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
        balance = cfg.data.balance == "sampler"
        sample_weight = (1.0 / counts.clamp(min=1))[labels] if balance else None
        return cls(cfg.optim.label_smoothing, class_weight), sample_weight

    @classmethod
    def unweighted(cls, cfg: TrainConfig) -> Task:
        return cls(cfg.optim.label_smoothing)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return soft_cross_entropy(logits, target, self.label_smoothing, self.class_weight)

    def soft_target_loss(self, logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """KL(teacher || student) of the softmax outputs."""
        return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1),
                        reduction="batchmean", log_target=True)  # fmt: skip

    def count_correct(self, logits: Tensor, target: Tensor) -> float:
        return float((logits.argmax(1).cpu() == target).sum().item())

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        return {
            "val_loss": F.cross_entropy(logits, target).item(),
            "val_acc": (logits.argmax(1) == target).float().mean().item(),
        }

    def probabilities(self, logits: Tensor, temperature: float = 1.0) -> Tensor:
        return torch.softmax(logits.float() / temperature, dim=1)

    def answers(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> list[Answer]:
        """The top class and its probability, and the ``k`` best classes."""
        conf, idx = probs.topk(k, dim=1)
        out: list[Answer] = []
        for c, j in zip(conf, idx, strict=True):
            top = [(classes[int(a)], float(v)) for a, v in zip(j, c, strict=True)]
            out.append((top[0][0], top[0][1], top, None, None))
        return out

    def answer(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> dict[str, Any]:
        """``{"label", "confidence", "top_k": [[class, p], ...]}``."""
        ((label, conf, top, _, _),) = self.answers(probs[None], classes, k, thresholds)
        return {"label": label, "confidence": conf, "top_k": [list(t) for t in top]}

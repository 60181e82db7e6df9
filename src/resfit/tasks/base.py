"""The :class:`Task` interface: what the loop, evaluation and inference ask of a kind of label
(the loss, the metrics, the post-processing of logits into probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.labels import LabelCoding

if TYPE_CHECKING:
    from ..core.config import TrainConfig

# One image's answer, as resfit.inference.Prediction holds it after the path: the label text,
# the confidence, the top-k (class, probability) pairs, and for label sets the chosen classes
# and every class's probability (else None).
Answer = tuple[str, float, list[tuple[str, float]], Any, Any]


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
    metric_label: ClassVar[str] = "score"  # how the CLI names the monitored metric
    coding: ClassVar[LabelCoding]  # how a sample's label is held (resfit.core.labels)
    # Why conformal sets / --max-risk do not apply to this task (None: they do); said as is.
    sets_note: ClassVar[str | None] = None

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, all_labels: Tensor, labels: Tensor, device: torch.device
    ) -> tuple[Task, Tensor | None]:
        """The task for a training run, and the per-image draw weights of this rank's
        ``labels`` (``--balance sampler``; None for none), from the whole split's
        ``all_labels`` so that every rank weighs a class the same."""
        raise NotImplementedError

    @classmethod
    def unweighted(cls, cfg: TrainConfig) -> Task:
        """The task as the config asks, without weights from the labels (the LR finder's)."""
        raise NotImplementedError

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def distill_loss(
        self, logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float,
        hard_weight: float,
    ) -> Tensor:  # fmt: skip
        """The student's loss against the teacher's outputs on the same (mixed) images at
        ``temperature`` (scaled by its square, so the gradients keep their size, as Hinton et
        al. 2015), plus ``hard_weight`` times :meth:`loss` on the labels ``target``."""
        soft = self.soft_target_loss(logits.float() / temperature,
                                     teacher_logits.float() / temperature)  # fmt: skip
        soft = soft * temperature**2
        if not hard_weight:
            return soft
        return (1 - hard_weight) * soft + hard_weight * self.loss(logits, target)

    def soft_target_loss(self, logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """How far ``logits`` are from ``teacher_logits`` (both already divided by the
        temperature), averaged over the batch."""
        raise NotImplementedError

    def count_correct(self, logits: Tensor, target: Tensor) -> float:
        """How many of a training batch's (hard) targets the logits get right."""
        raise NotImplementedError

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        """``val_loss`` and the monitored metric (and others) for validation logits."""
        raise NotImplementedError

    def probabilities(self, logits: Tensor, temperature: float | Sequence[float] = 1.0) -> Tensor:
        raise NotImplementedError

    def answers(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> list[Answer]:
        """Each image's answer from its (calibrated) probabilities: ``k`` best classes, and
        where the task decides by thresholds, the classes at or above them."""
        raise NotImplementedError

    def answer(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> dict[str, Any]:
        """One image's answer as JSON (what ``resfit serve`` returns for it): ``k`` best."""
        raise NotImplementedError

    def abstain(self, answer: dict[str, Any]) -> dict[str, Any]:
        """An answer for an image called unknown: no label, the best guess kept beside it."""
        return {**answer, "label": None, "best_guess": answer.get("label")}

    def eval_scores(self, logits: Tensor, targets: Tensor) -> dict[str, float]:
        """Scores of this task's own that an evaluation reports besides the usual ones of its
        labels (accuracy ...; mAP ...): none for the built-in tasks."""
        return {}

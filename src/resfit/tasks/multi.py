"""Any number of classes per image: a sigmoid per class, binary cross-entropy or the asymmetric
loss (ASL), mean average precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import ConfigError
from ..core.labels import MULTI_HOT, LabelCoding
from .base import Answer, Task

if TYPE_CHECKING:
    from ..core.config import TrainConfig


def asymmetric_loss(
    logits: Tensor,
    target: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    pos_weight: Tensor | None = None,
) -> Tensor:
    """The asymmetric loss (Ridnik et al., ICCV 2021) for multi-label targets in [0, 1].

    With many classes most outputs are easy negatives whose summed gradient drowns the few
    positives. ASL focuses the negative term (``p ** gamma_neg``) and discards negatives below
    ``clip`` (probability shifting). With ``gamma_neg = gamma_pos = clip = 0`` it is binary
    cross-entropy. Averaged over every output, as ``binary_cross_entropy_with_logits`` is, so
    the learning rates of one suit the other.
    """
    logits = logits.float()
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    pos = target * F.logsigmoid(logits)
    if gamma_pos:
        pos = pos * (1 - p).pow(gamma_pos)
    if pos_weight is not None:
        pos = pos * pos_weight
    neg = (1 - target) * torch.log((1 - p_neg).clamp(min=1e-8))
    if gamma_neg:
        neg = neg * p_neg.pow(gamma_neg)
    return -(pos + neg).mean()


def average_precisions(scores: Any, target: Any) -> list[float | None]:
    """Average precision per class (scikit-learn), None for a class without positives (its AP
    is undefined: it is left out of means)."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(target) > 0.5
    return [
        float(average_precision_score(y[:, j], s[:, j])) if y[:, j].any() else None
        for j in range(y.shape[1])
    ]


def mean_average_precision(scores: Any, target: Any) -> float:
    """Macro mAP: the mean of the per-class APs over the classes that have positives."""
    aps = [a for a in average_precisions(scores, target) if a is not None]
    return sum(aps) / len(aps) if aps else 0.0


@dataclass
class MultiLabel(Task):
    """Any number of classes per image: an independent sigmoid per class, binary
    cross-entropy (``pos_weight``: ``--balance weights``) or the asymmetric loss, and macro
    mAP on validation. Targets are multi-hot float vectors, or MixUp/CutMix mixes of them.

    Label smoothing pulls every target towards 1/2 by ``label_smoothing / 2``. What is
    predicted is decided by a threshold per class (tuned on validation, see
    :func:`resfit.tasks.calibration.calibrate_multilabel`), not by an argmax.
    """

    name: ClassVar[str] = "multilabel"
    monitor: ClassVar[str] = "val_mAP"
    metric_label: ClassVar[str] = "mAP"
    coding: ClassVar[LabelCoding] = MULTI_HOT
    label_smoothing: float = 0.0
    pos_weight: Tensor | None = None
    loss_kind: str = "bce"  # or "asl"

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, all_labels: Tensor, labels: Tensor, device: torch.device
    ) -> tuple[Task, Tensor | None]:
        """``--balance weights`` gives each class the positive weight negatives / positives
        (BCE's usual weighting: a rare label's misses cost as much as its absence)."""
        if cfg.data.balance == "sampler":
            raise ConfigError(
                "--balance sampler draws images by their class, and a multi-label image has "
                "several: use --balance weights (positive weights per class)"
            )
        pos_weight = None
        if cfg.data.balance == "weights":
            pos = all_labels.sum(0)
            pos_weight = ((len(all_labels) - pos) / pos.clamp(min=1)).clamp(min=1.0).to(device)
        return cls(cfg.optim.label_smoothing, pos_weight, cfg.optim.multilabel_loss), None

    @classmethod
    def unweighted(cls, cfg: TrainConfig) -> Task:
        return cls(cfg.optim.label_smoothing, loss_kind=cfg.optim.multilabel_loss)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, t = logits.float(), target.float()  # bf16 would round smoothed targets
        if self.label_smoothing:
            t = t * (1 - self.label_smoothing) + self.label_smoothing / 2
        if self.loss_kind == "asl":
            return asymmetric_loss(logits, t, pos_weight=self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=self.pos_weight)

    def soft_target_loss(self, logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Binary KL(teacher || student) per class (each class is its own sigmoid), averaged
        over the outputs as the BCE loss is."""
        p = torch.sigmoid(teacher_logits)
        entropy = F.binary_cross_entropy_with_logits(teacher_logits, p)  # 0 when they agree
        return F.binary_cross_entropy_with_logits(logits, p) - entropy

    def count_correct(self, logits: Tensor, target: Tensor) -> float:
        """Per image, the share of its classes that the logits decide right (at p = 0.5)."""
        right = (logits.detach().cpu() > 0) == (target.cpu() > 0.5)
        return float(right.float().mean(1).sum().item())

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        logits, target = logits.float(), target.float()
        return {
            "val_loss": F.binary_cross_entropy_with_logits(logits, target).item(),
            "val_mAP": mean_average_precision(logits.numpy(), target.numpy()),
            "val_label_acc": ((logits > 0) == (target > 0.5)).float().mean().item(),
        }

    def probabilities(self, logits: Tensor, temperature: float | Sequence[float] = 1.0) -> Tensor:
        """A probability per class: ``sigmoid(logits / T)`` with T per class (or one T)."""
        t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
        return torch.sigmoid(logits.float() / t)

    sets_note: ClassVar[str | None] = (
        "--conformal and --max-risk are for single-label runs; a multi-label run already "
        "answers with the set of labels at or above their thresholds (RUN/thresholds.json)"
    )

    def abstain(self, answer: dict[str, Any]) -> dict[str, Any]:
        """No labels for an unknown image; the labels it would have had kept beside them."""
        return {**answer, "labels": [], "best_guess": answer.get("labels")}

    def answer(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> dict[str, Any]:
        """``{"labels": [...], "probabilities": {class: p}}``: the classes at or above their
        thresholds, most probable first."""
        chosen = [(c, float(p)) for c, p, t in zip(classes, probs, thresholds, strict=True)
                  if float(p) >= t]  # fmt: skip
        chosen.sort(key=lambda cp: -cp[1])
        return {"labels": [c for c, _ in chosen],
                "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)}}  # fmt: skip

    def answers(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> list[Answer]:
        """The chosen classes joined by ``;`` as the label, the top class's probability as
        the confidence, the ``k`` most probable classes, the chosen ones, every class's."""
        out: list[Answer] = []
        for row in probs:
            a = self.answer(row, classes, k, thresholds)
            ranked = sorted(a["probabilities"].items(), key=lambda cp: -cp[1])
            labels = [(c, a["probabilities"][c]) for c in a["labels"]]
            out.append((";".join(a["labels"]), ranked[0][1], ranked[:k], labels,
                        a["probabilities"]))  # fmt: skip
        return out

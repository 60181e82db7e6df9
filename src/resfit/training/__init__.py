"""Training: the loop with events (:mod:`.loop`), its callbacks (:mod:`.callbacks`), the
recipes that choose them (:mod:`.recipes`), the step every trainer shares (:mod:`.step`), and
the run from data to run folder (:mod:`.run`)."""

import torch  # noqa: F401  (tests patch training.torch.save)

from ..core.config import TrainConfig
from ..core.errors import TrainingError
from ..tasks.base import soft_cross_entropy
from .distill import distill
from .loop import Callback, Loop
from .run import TrainResult, train
from .setup import build_transforms, resolve
from .step import TrainStep, lr_at, make_optimizer, param_groups, predict_logits

__all__ = [
    "Callback",
    "Loop",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "TrainingError",
    "build_transforms",
    "distill",
    "lr_at",
    "make_optimizer",
    "param_groups",
    "predict_logits",
    "resolve",
    "soft_cross_entropy",
    "train",
]

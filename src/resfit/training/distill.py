"""Knowledge distillation: a finished run (the teacher) trains a smaller network (the student)
through the ordinary training loop.

``distill(TEACHER_RUN, DATA, student="resnet20_cifar", out="RUN")`` (``resfit distill``) is a
training run whose config names the teacher: the recipe adds
:class:`~resfit.training.teacher.TeacherTargets`, which labels every augmented, mixed batch
with the teacher's outputs. The student is an ordinary run folder: eval, predict, serve and
export work on it, and ``--resume`` continues it.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.config import TrainConfig
from .run import TrainResult, train
from .teacher import teacher_config

__all__ = ["DEFAULT_MIXING", "distill"]

# MixUp/CutMix when the user sets neither: Beyer et al.'s "function matching" (the teacher
# labels every mixed view) is what lets a student learn from many more views than images.
DEFAULT_MIXING = {"mixup": 0.8, "cutmix": 1.0}


def distill(
    teacher: str | os.PathLike,
    data: str | os.PathLike,
    *,
    student: str,
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    **options: Any,
) -> TrainResult:
    """Distil the run ``teacher`` into a new ``student`` architecture trained on ``data``,
    writing the run folder ``out``; returns the :class:`~resfit.training.run.TrainResult`.

    The student takes the teacher's input size and channels unless ``options`` say otherwise,
    MixUp/CutMix (:data:`DEFAULT_MIXING`) unless ``mixup``/``cutmix`` are given, and no feature
    cache (the teacher needs the images). ``temperature`` and ``hard_weight`` shape the loss.
    """
    tcfg, _ = teacher_config(teacher)
    given = dict(options)
    if cfg is None or cfg.model.img_size is None:
        given.setdefault("img_size", tcfg.get("img_size"))
    given.setdefault("in_chans", int(tcfg.get("in_chans", 3)))
    if not {"mixup", "cutmix"} & set(given) and (cfg is None or _no_mixing_given(cfg)):
        given.update(DEFAULT_MIXING)
    given["cache"] = "off"
    return train(cfg, teacher=str(teacher), data=str(data), arch=student, out=str(out), **given)


def _no_mixing_given(cfg: TrainConfig) -> bool:
    return cfg.augment.mixup is None and cfg.augment.cutmix is None

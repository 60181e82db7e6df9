"""The teacher of a distillation (:mod:`.distill`): a finished run's model, checked against the
student's data, and the callback that makes its outputs the student's targets.

Before each step :class:`TeacherTargets` runs the teacher on the very batch the student gets,
after augmentation and MixUp/CutMix (Beyer et al. 2022: the same views for both), and makes the
step's loss the task's :meth:`~resfit.tasks.base.Task.distill_loss` against those outputs. The
teacher runs in eval mode, BatchNorm folded, channels-last, in the run's precision (bf16 where
the CPU has it), without gradients.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.config import TrainConfig
from ..core.errors import ConfigError, ResfitError, TrainingError
from ..data.samples import DataSplits
from ..inference.folding import prepare_for_inference
from ..inference.predictor import load_run_model
from ..runs import load_run
from .loop import Callback, Loop

log = logging.getLogger("resfit")

__all__ = ["Teacher", "TeacherTargets", "check_teacher", "teacher_callback"]


def teacher_config(run: str | os.PathLike) -> tuple[dict, list[str]]:
    """The teacher run's config and classes; a ConfigError when it is not a finished run."""
    try:
        return load_run(run)
    except ResfitError as e:
        raise ConfigError(f"teacher {run}: {e}") from None
    except (OSError, ValueError) as e:  # an unreadable or broken config.json / classes.json
        raise ConfigError(f"teacher {run}: cannot read its run files ({e})") from None


def check_teacher(cfg: TrainConfig, splits: DataSplits) -> None:
    """Refuse a teacher whose classes, task or input channels differ from the student's data:
    its outputs would not mean the student's classes."""
    run = cfg.compress.teacher
    if not run:
        return
    tcfg, classes = teacher_config(run)
    if list(classes) != list(splits.classes):
        raise ConfigError(
            f"teacher {run} was trained on the classes {_short(classes)}, the data "
            f"{cfg.data.path} has {_short(splits.classes)}: distil on data with the teacher's "
            "classes (same names, same order)"
        )
    if tcfg.get("task", "single_label") != splits.task:
        raise ConfigError(
            f"teacher {run} is a {tcfg.get('task')} run and {cfg.data.path} holds "
            f"{splits.task} labels: use data of the teacher's kind"
        )
    if int(tcfg.get("in_chans", 3)) != cfg.model.in_chans:
        raise ConfigError(f"teacher {run} takes {tcfg.get('in_chans')} input channels, the "
                          f"student {cfg.model.in_chans}: give --in-chans {tcfg.get('in_chans')}")  # fmt: skip


def _short(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" ... ({len(names)})" if len(names) > 6 else "")


class Teacher:
    """A run's model as a callable on the student's batches: it converts them to the teacher's
    normalisation and size, and returns fp32 logits that autograd may use (no graph)."""

    def __init__(self, run: str | os.PathLike, cfg: TrainConfig, device: torch.device,
                 precision: str) -> None:  # fmt: skip
        model, tcfg, _ = load_run_model(run)
        self.run = str(run)
        self.engine = prepare_for_inference(model, device, precision)
        self.size = int(tcfg.get("img_size") or cfg.model.img_size)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t: one affine per channel.
        mean_s, std_s = torch.tensor(cfg.pre.mean), torch.tensor(cfg.pre.std)
        mean_t = torch.tensor(tcfg.get("mean") or cfg.pre.mean)
        std_t = torch.tensor(tcfg.get("std") or cfg.pre.std)
        self.scale = (std_s / std_t).view(1, -1, 1, 1).to(device)
        self.shift = ((mean_s - mean_t) / std_t).view(1, -1, 1, 1).to(device)
        self.identity = bool(torch.equal(mean_s, mean_t) and torch.equal(std_s, std_t))
        self.device = device

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).float()
            if not self.identity:
                x = x * self.scale + self.shift
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                  antialias=True, align_corners=False)  # fmt: skip
            out = self.engine(x)
        return out.clone()  # a normal tensor: an inference tensor cannot enter the loss's graph


class TeacherTargets(Callback):
    """Runs the teacher on each batch after MixUp/CutMix (order 45 > Mixing's 40), and makes
    the step's loss the task's distillation loss against its outputs."""

    order = 45

    def __init__(self, teacher: Teacher, temperature: float, hard_weight: float) -> None:
        self.teacher, self.temperature, self.hard_weight = teacher, temperature, hard_weight
        self.targets: Tensor | None = None
        self._plain_loss: Any = None

    def before_fit(self, loop: Loop) -> None:
        self._plain_loss = loop.step.loss_fn
        task = loop.task

        def loss(logits: Tensor, target: Tensor) -> Tensor:
            assert self.targets is not None, "the teacher has not seen this batch"
            return task.distill_loss(logits, self.targets, target, self.temperature,
                                     self.hard_weight)  # fmt: skip

        loop.step.loss_fn = loss
        if loop.dist.main and loop.start_epoch == 0:
            logits = torch.cat([self.teacher(x) for x, _ in _val_batches(loop)]).cpu()
            metrics = task.val_metrics(logits, loop.data.val.decoded.labels[: len(logits)])
            log.info("teacher %s on this validation split: %s", self.teacher.run,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip

    def before_step(self, loop: Loop) -> None:
        if loop.features is not None:  # the step trains on cached features, not images
            raise TrainingError("distillation shows the teacher the images: give --cache off")
        self.targets = self.teacher(loop.x)

    def after_fit(self, loop: Loop) -> None:
        loop.step.loss_fn, self.targets = self._plain_loss, None


def _val_batches(loop: Loop) -> Any:
    from ..data.datasets import iter_batches

    n, bs = len(loop.data.val), max(64, loop.local_bs)
    return iter_batches(loop.data.val, [list(range(i, min(i + bs, n))) for i in range(0, n, bs)])


def teacher_callback(cfg: TrainConfig, device: torch.device, precision: str) -> TeacherTargets:
    """The distillation callback of a run whose config names a teacher."""
    c = cfg.compress
    teacher = Teacher(c.teacher, cfg, device, precision)
    log.info("distilling from %s (temperature %g, labels' weight %g)", c.teacher, c.temperature,
             c.hard_weight)  # fmt: skip
    return TeacherTargets(teacher, c.temperature, c.hard_weight)

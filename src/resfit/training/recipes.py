"""Recipes: a training run is the loop plus a list of callbacks, chosen here from the config.

``default`` trains everything not frozen by ``--freeze`` with one learning-rate cycle.
``finetune`` trains the new head with the backbone frozen for ``--head-epochs``, then unfreezes
(all at once or one stage per epoch) with discriminative per-stage rates and a second cycle at
half the peak rate. Both use the frozen-prefix feature cache where it pays.

Add a callback: write it in ``callbacks.py`` and append it in :func:`callbacks_for`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.config import TrainConfig
from ..core.errors import ConfigError
from ..models import transfer
from ..models.adapters import adapt
from ..runs import RunPaths
from .callbacks import (
    BestModel,
    Checkpoint,
    EarlyStopping,
    EpochLog,
    FeatureCaching,
    FreezeSchedule,
    GradScaling,
    LRSchedule,
    Mixing,
    PreciseBN,
    Progress,
    ShareCores,
    StopOnNonFinite,
    WeightAveraging,
    default_ema_decay,
)
from .loop import Callback, Loop
from .qat import QuantizationAware
from .step import param_groups
from .teacher import teacher_callback

log = logging.getLogger("resfit")


def param_groups_for(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """The optimizer's parameter groups, each with its ``peak_lr``: one rate for the plain
    recipe; for finetune one group per stage (frozen-for-now groups get no gradient)."""
    t, lr = cfg.transfer, cfg.optim.lr
    if t.recipe == "finetune":
        groups = transfer.discriminative_groups(model, cfg.optim.weight_decay, lr, t.stem_lr_ratio)
    else:
        groups = param_groups(model, cfg.optim.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError(f"--freeze {t.freeze} leaves nothing to train")
    for g in groups:
        g.setdefault("peak_lr", lr)
    return groups


def log_recipe(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
    t = cfg.transfer
    if t.recipe == "finetune":
        rates = {g["stage"]: g["peak_lr"] for g in optimizer.param_groups}
        log.info(
            "finetune: %d epoch(s) head only, then --freeze %s (%s), peak lr %s",
            min(t.head_epochs, cfg.optim.epochs), t.freeze, t.unfreeze,
            ", ".join(f"{k} {v:.2g}" for k, v in rates.items()),
        )  # fmt: skip


def callbacks_for(
    cfg: TrainConfig,
    loop: Loop,
    transforms: tuple,
    mix: Callable | None,
    out: Path,
    resume: bool,
    precision: str,
    show: bool,
) -> list[Callback]:
    """The callbacks of a run, from its config."""
    r, main = cfg.run, loop.dist.main
    cbs: list[Callback] = [
        StopOnNonFinite(cfg.optim.lr, RunPaths(out).last),
        FreezeSchedule(cfg, adapt(loop.model).stage_names),
        FeatureCaching(cfg, transforms, mix is not None, out, show),
        LRSchedule(cfg, loop.steps_per_epoch),
        BestModel(loop.task.monitor),
        Checkpoint(RunPaths(out).checkpoints, resume, main, r.checkpoint_every),
        ShareCores(),
    ]
    if precision == "fp16":
        cbs.append(GradScaling(loop.step.device))
    if mix is not None:
        cbs.append(Mixing(mix))
    if cfg.compress.teacher:
        cbs.append(teacher_callback(cfg, loop.step.device, precision))
    if r.ema:
        decay = r.ema_decay
        if decay is None:
            decay = default_ema_decay(cfg.optim.epochs * loop.steps_per_epoch)
        log.info("EMA of the weights with decay %.5f per step", decay)
        cbs.append(WeightAveraging(loop.model, decay))
    if cfg.compress.qat:
        cbs.append(QuantizationAware(cfg.compress.qat, cfg.optim.epochs, out, main))
    if r.precise_bn:
        limit = cfg.data.limit_train_batches  # a smoke run re-estimates BN on what it trained on
        cbs.append(
            PreciseBN(min(r.precise_bn, limit * cfg.optim.batch_size) if limit else r.precise_bn)
        )
    if r.early_stopping is not None:
        cbs.append(EarlyStopping(r.early_stopping))
    if show:
        cbs.append(Progress(cfg.optim.epochs))
    if main:
        cbs.append(EpochLog(out, cfg.optim.epochs, r.tensorboard))
    if main and r.track == "mlflow":
        from .tracking import MlflowTracking  # MLflow is imported only when asked for

        cbs.append(MlflowTracking(cfg, out))
    return cbs

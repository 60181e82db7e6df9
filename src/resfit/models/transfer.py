"""Transfer learning that costs what it should: staged fine-tuning and freezing (the feature
cache of a frozen prefix is :mod:`resfit.models.feature_cache`).

- ``recipe="finetune"`` (``--recipe finetune``): the first ``head_epochs`` train the new head
  with the whole backbone frozen, then the network down to ``--freeze`` trains with
  discriminative learning rates (the stem at ``stem_lr_ratio`` of the head's rate, the stages
  in between geometrically), all at once or one stage per epoch (``unfreeze="gradual"``).
- Freezing: which modules a ``--freeze`` policy covers, with BatchNorm kept in eval mode there.

Below the training loop, which uses it; knows nothing of it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.config import TransferConfig
from ..core.errors import ConfigError
from .adapters import adapt

# Part of every cache key: bump when what a cached tensor means changes.
CACHE_VERSION = 1
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Freezing


def frozen_modules(model: nn.Module, freeze: str) -> list[nn.Module]:
    """The modules a freeze policy covers, in order: the stem, then stages up to ``freeze``."""
    if freeze == "none":
        return []
    a = adapt(model)
    stages = list(a.stage_names)
    if freeze == "backbone":
        upto = len(stages) - 1
    elif freeze in stages:
        upto = stages.index(freeze)
    else:
        raise ConfigError(
            f"--freeze {freeze}: {type(model).__name__} has stages {', '.join(stages)} (or use backbone)"
        )
    mods: list[nn.Module] = []
    for name in stages[: upto + 1]:
        mods.extend(a.stage_modules(name))
    return mods


def apply_freeze(model: nn.Module, freeze: str, train_bn: bool = False) -> list[nn.Module]:
    """Stop gradients in the frozen part; returns the modules to keep in eval mode (BN
    running statistics must not move in a frozen part)."""
    mods = frozen_modules(model, freeze)
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)
        if train_bn:
            for sub in m.modules():
                if isinstance(sub, nn.BatchNorm2d):
                    for p in sub.parameters():
                        p.requires_grad_(True)
    return [] if train_bn else mods


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()


# ---------------------------------------------------------------------------------------------
# Staged fine-tuning


def freeze_schedule(t: TransferConfig, epochs: int, stage_names: tuple[str, ...]) -> list[str]:
    """The freeze policy of every epoch. ``plain``: ``t.freeze`` throughout. ``finetune``:
    ``backbone`` for ``head_epochs``, then (gradual) one more stage per epoch from the top,
    down to ``t.freeze``."""
    if t.recipe != "finetune":
        return [t.freeze] * epochs
    head = min(t.head_epochs, epochs)
    policies = ["backbone"] * head
    if t.unfreeze == "gradual":
        # "backbone" freezes all stages; freezing up to stages[i] leaves stages[i+1:] training.
        stop = -1 if t.freeze == "none" else _policy_depth(t.freeze, stage_names)
        for i in range(len(stage_names) - 2, stop, -1):
            policies.append(stage_names[i])
    policies = policies[:epochs]
    return policies + [t.freeze] * (epochs - len(policies))


def _policy_depth(policy: str, stage_names: tuple[str, ...]) -> int:
    return len(stage_names) - 1 if policy == "backbone" else stage_names.index(policy)


def lr_phase(t: TransferConfig, epochs: int, epoch: int) -> tuple[int, int, float]:
    """(first epoch, number of epochs, lr scale) of the learning-rate cycle ``epoch`` is in:
    one cycle for the plain recipe; for ``finetune`` one for the head and one, at half the
    peak rate as fastai does, for the unfrozen network."""
    head = min(t.head_epochs, epochs) if t.recipe == "finetune" else 0
    if epoch < head:
        return 0, head, 1.0
    return head, epochs - head, 0.5 if head else 1.0


def refreeze(model: nn.Module, policy: str, train_bn: bool) -> list[nn.Module]:
    """Make everything trainable, then freeze ``policy``: the policy can loosen between epochs."""
    for p in model.parameters():
        p.requires_grad_(True)
    return apply_freeze(model, policy, train_bn)


def stage_lr_multipliers(stage_names: tuple[str, ...], stem_ratio: float) -> dict[str, float]:
    """Discriminative rates: the head 1, the stem ``stem_ratio``, stages in between on the
    geometric line (early layers hold generic features that need to move least)."""
    names = [*stage_names, "head"]
    n = len(names) - 1
    return {name: stem_ratio ** ((n - i) / n) for i, name in enumerate(names)}


def discriminative_groups(
    model: nn.Module, weight_decay: float, lr: float, stem_ratio: float
) -> list[dict]:
    """Parameter groups per stage (and decay / no decay), each with its ``peak_lr``."""
    a = adapt(model)
    mults = stage_lr_multipliers(a.stage_names, stem_ratio)
    owner: dict[int, str] = {}
    for name in a.stage_names:
        for m in a.stage_modules(name):
            for p in m.parameters():
                owner[id(p)] = name
    groups: dict[tuple[str, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((owner.get(id(p), "head"), p.ndim <= 1), []).append(p)
    return [
        {
            "params": ps,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "peak_lr": lr * mults[stage],
            "stage": stage,
        }
        for (stage, no_decay), ps in groups.items()
    ]

"""The search space of ``resfit tune``: which options a study searches, in which ranges, and
how a trial's parameters become training options.

The space depends on the recipe and on what is fixed: an option given on the command line (or
as a keyword to :func:`resfit.apps.tune.tune`) is never searched. Two parameters are not options
themselves: ``crop_min`` (the smallest crop area, the strength of the random crops, which
matters most at low resolution) and ``mix`` (MixUp, CutMix, both or neither).

Imports no torch and no Optuna: the CLI builds its help from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from ...core.config import TrainConfig
from ...core.defaults import default_lr, default_weight_decay, settle_recipe
from ...core.presets import PRESETS

# MixUp / CutMix pairs, as (mixup alpha, cutmix alpha): the alphas of timm's and torchvision's
# recipes; searching the alphas as well buys little for the trials it costs.
MIXES: dict[str, tuple[float, float]] = {
    "off": (0.0, 0.0),
    "mixup": (0.2, 0.0),
    "cutmix": (0.0, 1.0),
    "both": (0.2, 1.0),
}
# Weight decay ranges per optimizer (log scale), around each one's default.
_WEIGHT_DECAY = {"sgd": (1e-5, 1e-2), "adam": (1e-6, 1e-3), "adamw": (1e-3, 0.3)}
# Freeze depths a transfer run may search; every ResNet (CIFAR ones have three stages) has these.
_FREEZE = ("none", "stem", "layer1", "layer2", "backbone")

# A parameter: ("log", low, high), ("float", low, high), ("int", low, high) or ("cat", choices).
Spec = tuple


def head_only(cfg: TrainConfig, given: Collection[str]) -> bool:
    """Trials train the head alone on a fixed backbone: one feature cache serves the study."""
    return "freeze" in given and cfg.transfer.freeze == "backbone"


def search_space(cfg: TrainConfig, given: Collection[str]) -> dict[str, Spec]:
    """The parameters a study searches for ``cfg`` (its recipe, optimizer and whether it starts
    from weights), leaving out those fixed by ``given`` option names."""
    cfg = settle_recipe(cfg)
    o, t = cfg.optim, cfg.transfer
    lr0 = default_lr(cfg)
    space: dict[str, Spec] = {
        # From a tenth to 20x the default: the flowers task wanted 10x.
        "lr": ("log", lr0 / 10, lr0 * 20),
        "weight_decay": ("log", *_WEIGHT_DECAY[o.optimizer]),
        "label_smoothing": ("float", 0.0, 0.2),
        "ema": ("cat", (False, True)),
    }
    if not head_only(cfg, given):
        # A shared feature cache needs one augmentation, and unmixed images: not searched there.
        space.update(augment=("cat", PRESETS), crop_min=("float", 0.08, 1.0),
                     mix=("cat", tuple(MIXES)))  # fmt: skip
    if cfg.model.weights is not None:
        if t.recipe == "finetune":
            # The head phase, then the depth that stays frozen after it.
            space["head_epochs"] = ("int", 0, max(1, o.epochs // 2))
            space["freeze"] = ("cat", _FREEZE[:-1])
        else:
            space["freeze"] = ("cat", _FREEZE)
    blocked = set(given)
    if (
        "augment" in given
        and cfg.augment.resolved(cfg.model.img_size, cfg.short_scratch).preset == "none"
    ):
        blocked.add("crop_min")
    if {"mixup", "cutmix"} & blocked:
        blocked.add("mix")
    if "ema_decay" in given:
        blocked.add("ema")
    return {k: v for k, v in space.items() if k not in blocked}


def defaults_of(cfg: TrainConfig, space: Mapping[str, Spec]) -> dict[str, Any]:
    """The parameters a plain ``resfit train`` with the fixed options would use: the study's
    first trial, so that the best trial is measured against them. A default outside the
    searched range (Adam's weight decay 0 on a log scale) is left to the sampler."""
    aug = cfg.augment.resolved(cfg.model.img_size, cfg.short_scratch)  # auto: what train picks
    mix = next((k for k, v in MIXES.items() if v == (aug.mixup, aug.cutmix)), None)
    values = {
        "lr": cfg.optim.lr if cfg.optim.lr is not None else default_lr(cfg),
        "weight_decay": cfg.optim.weight_decay
        if cfg.optim.weight_decay is not None
        else default_weight_decay(cfg.optim.optimizer),
        "label_smoothing": cfg.optim.label_smoothing,
        "ema": cfg.run.ema,
        "augment": aug.preset,
        "crop_min": aug.crop_scale[0] if aug.preset != "none" else None,  # as in suggest()
        "mix": mix,
        "head_epochs": cfg.transfer.head_epochs,
        "freeze": cfg.transfer.freeze,
    }
    return {k: values[k] for k, spec in space.items() if _inside(values[k], spec)}


def _inside(value: Any, spec: Spec) -> bool:
    if value is None:
        return False
    if spec[0] == "cat":
        return value in spec[1]
    return spec[1] <= value <= spec[2]


def suggest(trial: Any, space: Mapping[str, Spec]) -> dict[str, Any]:
    """Draw a trial's parameters (an ``optuna.Trial``); ``crop_min`` only where the preset
    crops at all."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if name == "crop_min" and params.get("augment") == "none":
            continue
        kind = spec[0]
        if kind == "cat":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        else:
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=kind == "log")
    return params


def options_for(cfg: TrainConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """The training options of a trial's parameters, on top of the fixed config ``cfg``."""
    options = {k: v for k, v in params.items() if k not in ("augment", "crop_min", "mix")}
    if {"augment", "crop_min", "mix"} & set(params):
        aug = cfg.augment
        if "augment" in params:
            aug = dataclasses.replace(aug, preset=params["augment"])
        if "crop_min" in params:
            aug = dataclasses.replace(aug, crop_scale=(float(params["crop_min"]), 1.0))
        if "mix" in params:
            mixup, cutmix = MIXES[params["mix"]]
            aug = dataclasses.replace(aug, mixup=mixup, cutmix=cutmix)
        options["augment"] = aug
    return options

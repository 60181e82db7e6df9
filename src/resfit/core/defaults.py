"""The default policy: what :func:`resolve_config` fills in when an option is not given.

The learning rate (by optimizer, batch and recipe), the weight decay, the preprocessing of the
weights and the image size, and the augmentation preset of ``--augment auto`` (by the size,
:mod:`resfit.core.presets`); :func:`defaults_note` says which defaults were chosen. Builds on
the schema (:mod:`resfit.core.config`), which imports nothing from here. No torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .config import Preprocessing, TrainConfig
from .errors import ConfigError
from .presets import SHORT_SCRATCH_EPOCHS


def resolve_config(
    cfg: TrainConfig, classes: list[str], pretrained: Mapping[str, Any], default_input_size: int
) -> TrainConfig:
    """A new config with the derived values filled in: the classes, the preprocessing of
    the weights (``pretrained``: their ``pretrained_cfg``, with ``mean`` and ``std``), the
    image size, the augmentation preset of ``auto`` (by the size), and the default learning
    rate and weight decay. :func:`defaults_note` says which defaults it chose."""
    cfg = settle_recipe(cfg)
    mean, std = tuple(pretrained["mean"]), tuple(pretrained["std"])
    # Statistics per input channel: a 1-channel model sees luminance (the average of the
    # RGB statistics); 1-channel statistics (weights of a grey run) repeat for RGB.
    if cfg.model.in_chans == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif cfg.model.in_chans == 3 and len(mean) == 1:
        mean, std = mean * 3, std * 3
    img_size = cfg.model.img_size or pretrained.get("input_size") or default_input_size
    # The weights' own resize only holds at the size they were trained at.
    same_size = img_size == pretrained.get("input_size")
    resize = pretrained.get("resize_size") if same_size else None
    pre = Preprocessing(
        tuple(classes), mean, std, resize, str(pretrained.get("interpolation") or "bilinear")
    )
    if cfg.optim.lr == "auto":
        raise ConfigError("--lr auto is settled by resfit.train (a sweep) before resolving")
    optim = dataclasses.replace(
        cfg.optim,
        lr=cfg.optim.lr if cfg.optim.lr is not None else default_lr(cfg),
        weight_decay=cfg.optim.weight_decay
        if cfg.optim.weight_decay is not None
        else default_weight_decay(cfg.optim.optimizer),
    )
    model = dataclasses.replace(cfg.model, img_size=int(img_size))
    augment = cfg.augment.settled(int(img_size), cfg.short_scratch)
    return dataclasses.replace(cfg, model=model, optim=optim, augment=augment, pre=pre)


def settle_recipe(cfg: TrainConfig) -> TrainConfig:
    """``--recipe auto``: ``finetune`` for a run from weights longer than its head phase,
    ``plain`` otherwise (from scratch).

    Measured (issue 27, 2-core Zen 4): with ``--weights`` alone the plain recipe at the
    transfer rate reached 69.9 % on two insect classes (CIFAR ResNet-56, 64 px, 30 epochs) where
    finetune reached 81.7 %, and 0.590 mAP where finetune reached 0.822 on a multi-label set
    (the issue's measurements; bench/defaults.py does not yet run a plain-vs-auto arm). A frozen backbone trains the head
    alone either way; finetune with ``--freeze layerN`` unfreezes down to that stage."""
    if cfg.transfer.recipe != "auto":
        return cfg
    # A run no longer than the head phase would never unfreeze: one rate for all then (a
    # 1-epoch run from the CIFAR ResNet-56 on flowers5 at 32 px: 0.51 plain, 0.40 head only).
    finetune = cfg.model.weights is not None and cfg.optim.epochs > cfg.transfer.head_epochs
    return cfg.replace(recipe="finetune" if finetune else "plain")


# SGD peak rates per 256 images of batch (linear scaling): from scratch; the head's rate, for
# the finetune recipe (the head trains alone first, then the stages at a half-cycle with
# discriminative rates) and for --freeze backbone (the head alone throughout); any other run
# from weights. Chosen by bench/defaults.py: on flowers5 from the CIFAR ResNet-56 at 32 px,
# finetune at 0.2 (batch 64) reached 83.6 % where the old 0.01 reached 68.9 %; head-only at
# 224 px, the study's best rates were 0.13-0.18 (batch 64).
SGD_LR_PER_256 = {"scratch": 0.2, "head": 0.8, "transfer": 0.04}


def default_lr(cfg: TrainConfig) -> float:
    """The peak rate when ``--lr`` is not given: for SGD linear in the batch, by recipe
    (:data:`SGD_LR_PER_256`); Adam and AdamW 1e-3 from scratch, 3e-4 from weights."""
    cfg = settle_recipe(cfg)
    o, transfer = cfg.optim, cfg.model.weights is not None
    if o.optimizer == "sgd":
        head = cfg.transfer.recipe == "finetune" or cfg.transfer.freeze == "backbone"
        kind = "scratch" if not transfer else "head" if head else "transfer"
        return SGD_LR_PER_256[kind] * o.batch_size / 256
    return 3e-4 if transfer else 1e-3


def defaults_note(given: TrainConfig, resolved: TrainConfig) -> str:
    """One line naming the defaults :func:`resolve_config` chose (for the log): those
    that depend on the batch, the recipe or the image size."""
    parts = []
    if given.optim.lr is None:
        kind = "from weights" if resolved.model.weights else "from scratch"
        t = resolved.transfer
        picked = " (auto)" if given.transfer.recipe == "auto" else ""
        recipe = (f", recipe {t.recipe}{picked}, --freeze {t.freeze}"
                  if resolved.model.weights else "")  # fmt: skip
        parts.append(f"lr {resolved.optim.lr:.3g} ({resolved.optim.optimizer}, batch "
                     f"{resolved.optim.batch_size}, {kind}{recipe})")  # fmt: skip
    elif given.transfer.recipe == "auto" and resolved.model.weights:
        parts.append(f"recipe {resolved.transfer.recipe} (auto, from weights)")
    if given.optim.weight_decay is None:
        parts.append(f"weight decay {resolved.optim.weight_decay:g}")
    if given.augment.preset == "auto":
        a, size = resolved.augment.resolved(), resolved.model.img_size
        if a.preset == "none":
            parts.append(f"augment none ({size} px, from scratch, {resolved.optim.epochs} "
                         f"epochs <= {SHORT_SCRATCH_EPOCHS})")  # fmt: skip
        else:
            parts.append(f"augment {a.preset}, crops {a.crop_scale[0]:.0%}-"
                         f"{a.crop_scale[1]:.0%} ({size} px)")  # fmt: skip
    return "defaults: " + ", ".join(parts) if parts else ""


def default_weight_decay(optimizer: str) -> float:
    return {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}[optimizer]

"""The learning-rate finder: the exponential sweep of Smith (2015), plotted and suggested.

It trains a throwaway copy through the same :class:`~resfit.training.step.TrainStep` as a
run, with the rate rising from ``start_lr`` to ``end_lr``, and stops when the loss explodes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import runtime, threads
from ..core.atomic import atomic_open, atomic_path, atomic_write_json
from ..core.config import TrainConfig
from ..core.errors import ConfigError, DataError
from ..data.augmentation import batch_transform
from ..data.datasets import TransformedImages, decode_all, iter_batches
from ..data.discovery import discover
from ..data.preprocessing import base_size_for
from ..models.transfer import apply_freeze, set_train_mode
from ..runs import RunPaths
from ..tasks.multi import MultiLabel
from ..tasks.single import SingleLabel
from .callbacks import multilabel_mix
from .setup import build_transforms, resolve
from .step import TrainStep, make_optimizer, param_groups

log = logging.getLogger("resfit")


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float  # steepest descent of the smoothed loss
    lr_min: float  # where the smoothed loss was lowest
    plot: Path | None = None


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest-descent lr, lowest-loss lr) of a smoothed sweep. The steepest point is where
    the loss falls fastest per decade of lr, searched before the minimum (past it, the loss
    is on its way up) and after the first tenth of the sweep: there the running average still
    settles from one batch's loss, and its fall says nothing about the rate (on flowers5 it
    put the steepest point at 1e-7)."""
    if len(lrs) < 3:
        raise ConfigError("the sweep needs at least 3 points to suggest a learning rate")
    lo = int(np.argmin(losses))
    x, y = np.log10(lrs), np.asarray(losses)
    grad = np.gradient(y, x)
    start = max(1, len(lrs) // 10)
    end = max(lo, start + 1)
    steep = int(np.argmin(grad[start:end])) + start
    return float(lrs[steep]), float(lrs[lo])


class _Smoother:
    """Exponential moving average with bias correction: one batch's loss is noisy."""

    def __init__(self) -> None:
        self.avg, self.n, self.best = 0.0, 0, math.inf

    def add(self, value: float) -> float:
        self.avg = 0.9 * self.avg + 0.1 * value if math.isfinite(value) else math.inf
        self.n += 1
        return self.avg / (1 - 0.9**self.n)


def lr_find(
    cfg: TrainConfig,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    out: str | Path | None = None,
) -> LRFindResult:
    """Sweep the learning rate over ``steps`` batches, write ``lr_find.png``, ``lr_find.csv``
    and ``lr_find.json`` to ``out`` and suggest a rate. Under the finetune recipe it sweeps the head
    phase (backbone frozen)."""
    if not 0 < start_lr < end_lr:
        raise ConfigError("lr-find needs 0 < --start-lr < --end-lr")
    if steps < 5:
        raise ConfigError("lr-find needs at least 5 --steps")
    cfg = cfg.check()
    if cfg.optim.lr == "auto":  # the sweep sets the rate itself
        cfg = cfg.replace(lr=None)
    if cfg.runtime.threads is not None or not threads.is_configured():
        threads.configure(cfg.runtime.threads)
    torch.manual_seed(cfg.runtime.seed)
    device = runtime.pick_device(cfg.runtime.device)
    precision = runtime.pick_precision(device, cfg.runtime.precision)
    splits = discover(cfg.data.path, val_fraction=cfg.data.val_fraction, seed=cfg.runtime.seed,
                      task=cfg.data.task)  # fmt: skip
    cfg, model = resolve(cfg.replace(task=splits.task), splits)
    # Only as many images as the sweep can use: decoding 3,000 photos for 50 steps wastes time.
    g = torch.Generator().manual_seed(cfg.runtime.seed)
    order = torch.randperm(len(splits.train), generator=g)[: steps * cfg.optim.batch_size].tolist()
    data = decode_all([splits.train[i] for i in order], base_size_for(cfg.model.img_size),
                      progress=cfg.run.progress)  # fmt: skip
    if len(data) < 2:
        raise DataError(f"lr-find: fewer than 2 readable training images in {cfg.data.path}")
    policy = "backbone" if cfg.transfer.recipe == "finetune" else cfg.transfer.freeze
    frozen = apply_freeze(model, policy, cfg.transfer.train_bn)
    model.to(device)
    optimizer = make_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), start_lr)
    multi = splits.task == "multilabel"
    loss_fn = (MultiLabel(cfg.optim.label_smoothing, loss_kind=cfg.optim.multilabel_loss) if multi
               else SingleLabel(cfg.optim.label_smoothing)).loss  # fmt: skip
    step = TrainStep(optimizer, loss_fn, device, precision, channels_last=False)
    set_train_mode(model, frozen)
    lrs, smoothed = _sweep(cfg, model, step, data, g, start_lr, end_lr, steps)
    suggestion, lr_min = suggest_lr(lrs, smoothed)
    plot = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(RunPaths(out).lr_find_csv, "w") as f:
            f.write("lr,smoothed_loss\n")
            f.writelines(f"{a:.6g},{b:.6g}\n" for a, b in zip(lrs, smoothed, strict=True))
        summary = dict(steepest=suggestion, lowest_loss=lr_min, steps=len(lrs), policy=policy,
                       batch_size=cfg.optim.batch_size, lrs=lrs, smoothed_loss=smoothed)  # fmt: skip
        atomic_write_json(RunPaths(out).lr_find_json, summary, indent=1)
        plot = RunPaths(out).lr_find_plot
        _plot(lrs, smoothed, suggestion, lr_min, plot, f"{cfg.model.arch}, --freeze {policy}")
    log.info("lr-find: steepest descent at lr %.2g, lowest loss at %.2g", suggestion, lr_min)
    return LRFindResult(lrs, smoothed, suggestion, lr_min, plot)


def _sweep(cfg, model, step: TrainStep, data, g, start_lr, end_lr, steps):
    tr_tf, _ = build_transforms(cfg)
    multi = cfg.data.task == "multilabel"
    mix = multilabel_mix(cfg.augment) if multi else batch_transform(cfg.augment, len(cfg.classes))
    train_set = TransformedImages(data, tr_tf)
    bs = min(cfg.optim.batch_size, len(data))
    lrs: list[float] = []
    smoothed: list[float] = []
    smoother, best, i = _Smoother(), math.inf, 0
    while i < steps:
        perm = torch.randperm(len(data), generator=g)
        batches = [perm[j : j + bs] for j in range(0, len(perm) - bs + 1, bs)]
        for x, y in iter_batches(train_set, batches):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for grp in step.optimizer.param_groups:
                grp["lr"] = lr
            if mix is not None:
                x, y = mix(x, y)
            _, loss = step(model, x, y)
            s = smoother.add(loss.item())
            i += 1
            if not math.isfinite(s) or (i > 10 and s > 4 * best):
                return lrs, smoothed  # the loss exploded: the rest of the sweep says nothing
            lrs.append(lr)
            smoothed.append(s)
            best = min(best, s)
            if i >= steps:
                break
    return lrs, smoothed


def _plot(
    lrs: list[float], losses: list[float], suggestion: float, lr_min: float, path: Path, title: str
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested {suggestion:.2g}")
    ax.axvline(lr_min, color="tab:gray", ls=":", label=f"lowest loss {lr_min:.2g}")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix[1:] or "png")


__all__ = ["LRFindResult", "lr_find", "suggest_lr"]

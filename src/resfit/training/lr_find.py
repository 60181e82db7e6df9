"""The learning-rate finder: the exponential sweep of Smith (2015), plotted and suggested.

:class:`LRFinder` is a callback on the training :class:`~resfit.training.loop.Loop` (as
fastai's): it saves the weights, raises the rate from ``start_lr`` to ``end_lr`` batch by
batch, records the smoothed loss, ends the fit when the loss explodes or the sweep is done,
and puts the weights back. :func:`lr_find` runs it on a throwaway model, so the sweep steps
through the same :class:`~resfit.training.step.TrainStep` and loop as a run.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core import runtime, threads
from ..core.atomic import atomic_open, atomic_path, atomic_write_json
from ..core.config import TrainConfig
from ..core.defaults import settle_recipe
from ..core.errors import ConfigError, DataError
from ..core.windows import parse_window
from ..data.augmentation import batch_transform
from ..data.datasets import DecodedImages, TransformedImages, decode_all
from ..data.discovery import discover
from ..data.preprocessing import base_size_for
from ..data.sources import InMemory, Sharding
from ..models.transfer import apply_freeze
from ..runs import RunPaths
from ..tasks.base import Task
from ..tasks.registry import TASKS
from .callbacks import Mixing, multilabel_mix
from .distributed import Dist
from .loop import Callback, CancelFit, EpochData, Loop
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


class LRFinder(Callback):
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``steps``
    batches of a fit, recording the smoothed loss in :attr:`lrs` and :attr:`losses`; the fit
    ends (:class:`CancelFit`) when the sweep is done or the loss explodes (past 4x its lowest
    after the first 10 batches, or not finite), and the model and optimizer get back the state
    they had before the fit."""

    order = 30  # the learning rate's slot: before Mixing (40), as LRSchedule

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100) -> None:
        self.start_lr, self.end_lr, self.steps = start_lr, end_lr, steps
        self.lrs: list[float] = []
        self.losses: list[float] = []  # smoothed

    def before_fit(self, loop: Loop) -> None:
        # The sweep drives the weights to divergence: keep them to put back after.
        self.saved = copy.deepcopy(loop.model.state_dict())
        self.saved_opt = copy.deepcopy(loop.step.optimizer.state_dict())
        self.lrs, self.losses, self.best, self.smoother = [], [], math.inf, _Smoother()

    def before_step(self, loop: Loop) -> None:
        i = self.smoother.n  # batches swept so far
        self.lr = self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.steps - 1))
        for group in loop.step.optimizer.param_groups:
            group["lr"] = self.lr

    def after_loss(self, loop: Loop) -> None:
        s = self.smoother.add(loop.loss.item())
        if not math.isfinite(s) or (self.smoother.n > 10 and s > 4 * self.best):
            raise CancelFit  # the loss exploded: the rest of the sweep says nothing
        self.lrs.append(self.lr)
        self.losses.append(s)
        self.best = min(self.best, s)
        if self.smoother.n >= self.steps:
            raise CancelFit  # the sweep is done (its last step needs no update)

    def after_fit(self, loop: Loop) -> None:
        loop.model.load_state_dict(self.saved)
        loop.step.optimizer.load_state_dict(self.saved_opt)


class _ContinueSeededStream(Callback):
    """The sweep's augmentation and mixing draws go on from the stream seeded before the model
    was built, as they did when the finder had a loop of its own, rather than from the seed the
    Loop gives each epoch (for resumed runs; a sweep is never resumed): so a seed picks the
    same sweep, and ``--lr auto`` the same rate, as before."""

    def before_epoch(self, loop: Loop) -> None:
        self.state = torch.get_rng_state()

    def before_train(self, loop: Loop) -> None:
        torch.set_rng_state(self.state)


@dataclass
class _SweepBatches(Sharding):
    """The sweep's batches, as the loop's one epoch."""

    batches: list[list[int]] | None = None

    def epoch(self, epoch: int, weights: torch.Tensor | None = None) -> list[list[int]]:
        return self.batches or []


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
    cfg = settle_recipe(cfg.check())
    if cfg.optim.lr == "auto":  # the sweep sets the rate itself
        cfg = cfg.replace(lr=None)
    if cfg.runtime.threads is not None or not threads.is_configured():
        threads.configure(cfg.runtime.threads)
    torch.manual_seed(cfg.runtime.seed)
    cfg, model, data, g = _model_and_data(cfg, steps)
    policy = "backbone" if cfg.transfer.recipe == "finetune" else cfg.transfer.freeze
    finder = LRFinder(start_lr, end_lr, steps)
    _sweep_loop(cfg, model, policy, data, g, start_lr, finder).fit()
    lrs, smoothed = finder.lrs, finder.losses
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


def _model_and_data(
    cfg: TrainConfig, steps: int
) -> tuple[TrainConfig, nn.Module, DecodedImages, torch.Generator]:
    """The resolved config, a fresh model, and as many decoded training images as the sweep
    can use; ``g`` goes on to shuffle them."""
    splits = discover(cfg.data.path, val_fraction=cfg.data.val_fraction, seed=cfg.runtime.seed,
                      task=cfg.data.task)  # fmt: skip
    cfg, model = resolve(cfg.replace(task=splits.task), splits)
    # Only as many images as the sweep can use: decoding 3,000 photos for 50 steps wastes time.
    g = torch.Generator().manual_seed(cfg.runtime.seed)
    order = torch.randperm(len(splits.train), generator=g)[: steps * cfg.optim.batch_size].tolist()
    data = decode_all([splits.train[i] for i in order], base_size_for(cfg.model.img_size),
                      progress=cfg.run.progress, window=parse_window(cfg.data.window))  # fmt: skip
    if len(data) < 2:
        raise DataError(f"lr-find: fewer than 2 readable training images in {cfg.data.path}")
    return cfg, model, data, g


def _sweep_loop(
    cfg: TrainConfig,
    model: nn.Module,
    policy: str,
    data: DecodedImages,
    g: torch.Generator,
    start_lr: float,
    finder: LRFinder,
) -> Loop:
    """A loop of one epoch over the sweep's batches, with ``finder`` and the run's mixing."""
    frozen = apply_freeze(model, policy, cfg.transfer.train_bn)
    device = runtime.pick_device(cfg.runtime.device)
    precision = runtime.pick_precision(device, cfg.runtime.precision)
    model.to(device)
    optimizer = make_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay), start_lr)
    task: Task = TASKS.get(cfg.data.task).unweighted(cfg)
    step = TrainStep(optimizer, task.loss, device, precision, channels_last=False)
    k = len(cfg.classes)  # MixUp/CutMix of class indices; float targets mix as they are
    mix = (
        multilabel_mix(cfg.augment)
        if task.coding.float_targets
        else batch_transform(cfg.augment, k)
    )
    callbacks: list[Callback] = [finder, _ContinueSeededStream()]
    if mix is not None:
        callbacks.append(Mixing(mix))
    bs = min(cfg.optim.batch_size, len(data))
    plan = _SweepBatches([], [], bs, finder.steps, cfg.runtime.seed,
                         batches=_shuffled_batches(len(data), bs, finder.steps, g))  # fmt: skip
    train = TransformedImages(data, build_transforms(cfg)[0])
    # Never validated: the finder ends the fit mid-epoch, at its last batch.
    loop = Loop(model, model, step, task, EpochData(train, train, train), InMemory(parse_window(cfg.data.window)), callbacks,
                epochs=1, batch_size=bs, seed=cfg.runtime.seed, dist=Dist(), sharding=plan)  # fmt: skip
    loop.frozen = frozen
    return loop


def _shuffled_batches(n: int, bs: int, steps: int, g: torch.Generator) -> list[list[int]]:
    """``steps`` batches of ``bs`` of ``n`` images: a pass over them in a fresh order of ``g``
    after another, each without its last partial batch."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        batches += [perm[j : j + bs] for j in range(0, n - bs + 1, bs)]
    return batches[:steps]


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


__all__ = ["LRFindResult", "LRFinder", "lr_find", "suggest_lr"]

"""The callbacks that make up a training run. Each does one job, at the events it needs.

Order (lower first): guards and precision (0-5), freezing and the feature cache (10-20), the
learning rate and mixing (30-40), weight averaging (60), precise BN (70), the decisions on the
validation score (80-85), then logging and the checkpoint (90-95), which must see those
decisions.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import runs
from ..core.atomic import atomic_open, atomic_save, atomic_save_safetensors
from ..core.config import AugmentConfig, TrainConfig
from ..core.errors import TrainingError
from ..models import feature_cache, transfer
from .distributed import from_rank0
from .loop import Callback, Loop
from .step import lr_at, recompute_bn_stats

log = logging.getLogger("resfit")


class StopOnNonFinite(Callback):
    """A NaN or infinite loss stops the run before the bad step touches the weights."""

    order = 0

    def __init__(self, peak_lr: float, checkpoint: Path) -> None:
        self.peak_lr, self.checkpoint = peak_lr, checkpoint

    def after_loss(self, loop: Loop) -> None:
        if not torch.isfinite(loop.loss):
            where = self.checkpoint if self.checkpoint.exists() else f"{self.checkpoint} (none yet)"
            raise TrainingError(
                f"the loss became {loop.loss.item()} at epoch {loop.epoch + 1}, step "
                f"{loop.step_in_epoch + 1}: training stopped. The last good checkpoint is "
                f"{where}. Try a lower --lr (now {self.peak_lr:g}) or --grad-clip 1.0."
            )


class GradScaling(Callback):
    """fp16 needs loss scaling: its smallest normal number is 6e-5, and gradients below that
    flush to zero. bf16 has fp32's range and needs none."""

    order = 5

    def __init__(self, device: torch.device) -> None:
        self.scaler = torch.amp.GradScaler(device.type)

    def before_fit(self, loop: Loop) -> None:
        loop.step.scaler = self.scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)


class FreezeSchedule(Callback):
    """The freeze policy of each epoch (``--freeze``, or the finetune recipe's stages)."""

    order = 10

    def __init__(self, cfg: TrainConfig, stage_names: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.schedule = transfer.freeze_schedule(cfg.transfer, cfg.optim.epochs, stage_names)
        self.policy: str | None = None
        self.changed = False

    def before_epoch(self, loop: Loop) -> None:
        policy = self.schedule[loop.epoch]
        self.changed = policy != self.policy
        if self.changed:
            self.policy = policy
            loop.frozen = transfer.refreeze(loop.model, policy, self.cfg.transfer.train_bn)
            if self.cfg.transfer.recipe == "finetune":
                log.info("epoch %d: --freeze %s", loop.epoch + 1, policy)

    def epochs_left(self, epoch: int) -> int:
        """Epochs from ``epoch`` on that keep the current policy."""
        rest = self.schedule[epoch:]
        return next((i for i, p in enumerate(rest) if p != self.policy), len(rest))


class FeatureCaching(Callback):
    """Computes the frozen prefix once per image when the freeze policy changes (and it pays);
    the loop then trains and validates the rest from the stored features."""

    order = 20

    def __init__(self, cfg: TrainConfig, transforms: tuple, mixing: bool, out: Path, show: bool):
        self.cfg, self.transforms, self.mixing, self.out, self.show = (
            cfg, transforms, mixing, out, show,
        )  # fmt: skip

    def before_epoch(self, loop: Loop) -> None:
        freeze = loop.callback(FreezeSchedule)
        if not freeze.changed:
            return
        tr_tf, ev_tf = self.transforms
        loop.features = feature_cache.prepare_cache(
            self.cfg, loop.model, freeze.policy, freeze.epochs_left(loop.epoch),
            loop.data.train.decoded, loop.data.val.decoded, tr_tf, ev_tf, self.mixing,
            loop.dist.world, loop.step.device, loop.step.precision, self.out, self.show,
        )  # fmt: skip


class LRSchedule(Callback):
    """Warm-up then cosine (or one-cycle, or constant) over each learning-rate phase, set
    before every step; the finetune recipe has one phase for the head and one after."""

    order = 30

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)

    def before_epoch(self, loop: Loop) -> None:
        self.phase_start, phase_epochs, self.scale = transfer.lr_phase(
            self.cfg.transfer, self.cfg.optim.epochs, loop.epoch
        )
        self.total = phase_epochs * self.steps_per_epoch

    def before_step(self, loop: Loop) -> None:
        step = (loop.epoch - self.phase_start) * self.steps_per_epoch + loop.step_in_epoch
        mult = lr_at(step, self.total, self.warmup, self.cfg.optim.schedule) * self.scale
        for group in loop.step.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * mult


class Mixing(Callback):
    """MixUp / CutMix on the batch (the labels become soft); the loop keeps the hard labels
    for the training accuracy."""

    order = 40

    def __init__(self, mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        self.mix = mix

    def before_step(self, loop: Loop) -> None:
        if len(loop.y) > 1:
            loop.x, loop.y = self.mix(loop.x, loop.y)


def multilabel_mix(cfg: AugmentConfig) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """MixUp / CutMix for multi-hot targets (torchvision's take class indices): each image is
    mixed with its neighbour in the batch and the label vectors by the same share, as timm
    and fastai do. One of the two per batch when both are on; ``None`` when both are off."""
    c = cfg.resolved()
    if not (c.mixup or c.cutmix):
        return None

    def mix(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        cut = bool(c.cutmix) and (not c.mixup or bool(torch.rand(()) < 0.5))
        alpha = float(c.cutmix if cut else c.mixup)
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        x2, y2 = x.roll(1, 0), y.roll(1, 0)
        if cut:
            h, w = x.shape[-2:]
            ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x2[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share actually kept
        else:
            x = x * lam + x2 * (1 - lam)
        return x, y.float() * lam + y2.float() * (1 - lam)

    return mix


class WeightAveraging(Callback):
    """An exponential moving average of the weights and BN statistics (``--ema``), as in
    torchvision's and timm's recipes. Validation scores the average, and the run keeps it.

    The decay warms up as in timm (``min(decay, (1 + t) / (10 + t))``), so the average does
    not hold on to the random initial weights in short runs.
    """

    order = 60

    def __init__(self, model: nn.Module, decay: float) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.decay = decay
        self.averaged = AveragedModel(model, avg_fn=self._average, use_buffers=True)

    def _average(self, avg: Tensor, new: Tensor, n: Tensor) -> Tensor:
        d = min(self.decay, (1 + float(n)) / (10 + float(n)))
        return avg * d + new * (1 - d)

    def before_fit(self, loop: Loop) -> None:
        loop.eval_model = self.averaged.module

    def after_step(self, loop: Loop) -> None:
        self.averaged.update_parameters(loop.model)

    def after_train(self, loop: Loop) -> None:
        # The average is evaluated with the modes of the model (frozen BN stays in eval).
        for a, m in zip(self.averaged.module.modules(), loop.model.modules(), strict=True):
            a.training = m.training

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])


def default_ema_decay(total_steps: int) -> float:
    """A half-life of 5 % of the run's steps: long enough to smooth the noise of the last
    epochs, short enough to follow the weights of a run of a few hundred steps."""
    half_life = max(1.0, 0.05 * total_steps)
    return 0.5 ** (1.0 / half_life)


class PreciseBN(Callback):
    """Re-estimates the BN statistics of the model that is validated, after each epoch."""

    order = 70

    def __init__(self, n_images: int) -> None:
        self.n_images = n_images

    def after_train(self, loop: Loop) -> None:
        s = loop.step
        if loop.features is not None:
            net = loop.features.tail_for(loop.eval_model)
            data = loop.features.bn_set()
        else:
            net, data = loop.eval_model, loop.data.train_eval
        recompute_bn_stats(net, data, self.n_images, max(loop.local_bs, 32), s.device,
                           s.precision, s.channels_last)  # fmt: skip


class BestModel(Callback):
    """Tracks the best validation score; rank 0 decides, so every rank agrees."""

    order = 80

    def __init__(self, monitor: str) -> None:
        self.monitor, self.best, self.best_epoch = monitor, -1.0, 0

    def after_epoch(self, loop: Loop) -> None:
        score = loop.row[self.monitor]
        (improved,) = from_rank0([float(score > self.best)], loop.dist, loop.step.device)
        loop.improved = bool(improved)
        if loop.improved:
            self.best, self.best_epoch = score, loop.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EarlyStopping(Callback):
    """Stops after ``patience`` epochs without a better score. The patience left is part of the
    checkpoint (a resumed run stops where an uninterrupted one would), and rank 0's decision is
    broadcast (ranks that disagree would wait for each other forever)."""

    order = 85

    def __init__(self, patience: int) -> None:
        self.patience = self.left = patience

    def after_epoch(self, loop: Loop) -> None:
        self.left = self.patience if loop.improved else self.left - 1
        (stop,) = from_rank0([float(self.left <= 0)], loop.dist, loop.step.device)
        if stop:
            loop.stop = True
            log.info("early stopping: no better validation score for %d epochs", self.patience)

    def state_dict(self) -> dict[str, Any]:
        return {"left": self.left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.left = state["left"]


class Progress(Callback):
    """A progress bar over the batches, with the running loss, accuracy and speed."""

    order = 90

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def before_train(self, loop: Loop) -> None:
        from ..core.progress import progress_bar

        # On a terminal a bar; in a file or CI a line every LINE_EVERY_S seconds of a long
        # epoch (EpochLog writes the epoch's own line).
        self.bar = progress_bar(loop.batches, total=loop.steps_per_epoch - loop.first_step,
                                desc=f"epoch {loop.epoch + 1}/{self.epochs}")  # fmt: skip
        loop.batches = self.bar

    def after_step(self, loop: Loop) -> None:
        rate = loop.seen / (time.perf_counter() - loop.epoch_start)
        self.bar.set_postfix(loss=f"{loop.loss_sum / loop.seen:.3f}",
                             acc=f"{loop.correct / loop.seen:.3f}", img_s=f"{rate:.0f}")  # fmt: skip

    def after_train(self, loop: Loop) -> None:
        self.bar.close()


class EpochLog(Callback):
    """The epoch's line in the log, ``RUN/metrics.csv`` and, with ``--tensorboard``, its
    scalars (rank 0 only)."""

    order = 90

    def __init__(self, out: Path, epochs: int, tensorboard: bool) -> None:
        self.out, self.epochs, self.writer = out, epochs, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from ..core.errors import MissingExtraError

                raise MissingExtraError("tensorboard", "tensorboard") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def after_epoch(self, loop: Loop) -> None:
        r, monitor = loop.row, loop.task.monitor
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f %s %.4f  %.1fs (%.0f img/s)%s",
            r["epoch"], self.epochs, r["train_loss"], r["train_acc"], r["val_loss"],
            monitor.removeprefix("val_"), r[monitor], r["epoch_time_s"],
            r["train_images_per_s"], "  *best*" if loop.improved else "",
        )  # fmt: skip
        path = runs.RunPaths(self.out).metrics
        loop.try_write(path, lambda: write_metrics(path, loop.history))
        if self.writer:
            for k, v in r.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, r["epoch"])

    def after_fit(self, loop: Loop) -> None:
        if self.writer:
            self.writer.close()


class Checkpoint(Callback):
    """``checkpoints/last.pt`` after every epoch (the model, the optimizer, the history and
    every callback's state; the one before is kept as ``last.prev.pt``) and
    ``best.safetensors`` when the score improved; written atomically, so a crash or a full disk
    leaves the previous one intact, and a failed write is logged while training goes on
    (:meth:`Loop.try_write`). With ``every``, also
    every that many steps, with the epoch's position (batches done, running sums, random
    state): the epoch's batches are a function of the seed and the epoch, so a run resumed
    there continues with the very batches and augmentations it would have drawn. ``resume``
    restores all of it before the first epoch."""

    order = 95

    def __init__(self, folder: Path, resume: bool, main: bool, every: int | None = None) -> None:
        self.last, self.best = folder / runs.LAST, folder / runs.BEST
        self.prev, self.run = folder / runs.LAST_PREV, folder.parent
        self.resume, self.main, self.every = resume, main, every

    def before_fit(self, loop: Loop) -> None:
        if self.main:  # a killed run's temporary files (a checkpoint's size each) go first
            runs.clean_leftovers(self.run)
        found = runs.load_checkpoint(self.run) if self.resume else None
        if found is None:
            return
        ck, path = found
        loop.model.load_state_dict(ck["model"])
        loop.step.optimizer.load_state_dict(ck["optimizer"])
        loop.start_epoch, loop.history = ck["epoch"], ck["history"]
        states = ck.get("callbacks") or {
            "BestModel": {"best": ck["best_acc"], "best_epoch": ck["best_epoch"]}
        }
        for cb in loop.callbacks:
            if cb.name in states:
                cb.load_state_dict(states[cb.name])
        progress = ck.get("progress")
        if progress:
            loop.start_step, loop.partial = progress["step"], progress
            log.info("resuming %s at step %d of epoch %d", self.run, progress["step"],
                     ck["epoch"] + 1)  # fmt: skip
            return
        log.info("resuming %s after epoch %d of %d", self.run, ck["epoch"], loop.epochs)
        if loop.start_epoch >= loop.epochs:
            log.info("%s already finished its %d epochs", self.run, loop.epochs)

    def after_step(self, loop: Loop) -> None:
        done = loop.step_in_epoch + 1
        if self.every and done % self.every == 0 and done < loop.steps_per_epoch:
            self._save(loop, loop.epoch, loop.progress_state())

    def after_epoch(self, loop: Loop) -> None:
        if self.main and loop.improved:
            state = loop.eval_model.state_dict()
            loop.try_write(self.best, lambda: atomic_save_safetensors(state, self.best))
        self._save(loop, loop.epoch + 1, None)

    def _save(self, loop: Loop, epoch: int, progress: dict[str, Any] | None) -> None:
        if not self.main:
            return
        best = loop.callback(BestModel)
        state = {
            "model": loop.model.state_dict(),
            "optimizer": loop.step.optimizer.state_dict(),
            "epoch": epoch,
            "progress": progress,
            "best_acc": best.best if best else None,
            "best_epoch": best.best_epoch if best else None,
            "history": loop.history,
            "callbacks": {cb.name: cb.state_dict() for cb in loop.callbacks},
        }
        # The one before stays as last.prev.pt: resume falls back to it if last.pt is unreadable.
        loop.try_write(self.last, lambda: atomic_save(state, self.last, self.prev))


class ShareCores(Callback):
    """Between epochs, moves to this process's fair share of the CPUs (another resfit job may
    have started or ended)."""

    order = 1

    def before_epoch(self, loop: Loop) -> None:
        from ..core import threads

        threads.rebalance()


def write_metrics(path: Path, history: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


class ReportScore(Callback):
    """Hands each epoch's validation score to ``report(epoch, score)``: a hyperparameter
    search's pruner sees the run as it goes (``resfit tune``). ``report`` may raise to stop the
    run (``optuna.TrialPruned``); it runs after the epoch's log line and checkpoint."""

    order = 96

    def __init__(self, report: Callable[[int, float], None]) -> None:
        self.report = report

    def after_epoch(self, loop: Loop) -> None:
        self.report(loop.epoch + 1, float(loop.row[loop.task.monitor]))


class CacheLock(Callback):
    """Holds an exclusive lock on ``path`` while the feature cache is prepared (between the
    first ``before_epoch`` callbacks and ``before_train``), so processes that share one disk
    cache (the trials of a study) compute it once: the first writes it, the others wait and
    then reuse it. POSIX only; elsewhere it does nothing. :meth:`release` is safe to repeat."""

    order = 15  # before FeatureCaching (20)

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def before_epoch(self, loop: Loop) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no shared cache across processes there
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def before_train(self, loop: Loop) -> None:
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

"""The training loop: a short, flat ``fit`` that fires events, and callbacks that do the rest.

Events, in the order they fire::

    before_fit
      before_epoch     (freeze policy, feature cache, lr phase: before the epoch is seeded)
      before_train     (the epoch's batches are drawn: progress bars wrap them)
        before_step    (learning rate, MixUp/CutMix)
        after_loss     (the loss of the batch, before backward: checked to be finite)
        after_step     (EMA, progress)
      after_train      (precise BN)
      after_epoch      (validation is in ``loop.row``: best model, early stopping, logs,
                        checkpoint)
    after_fit

A callback overrides the events it needs and, if it has state that a resumed run must get
back (patience left, EMA weights, loss scale), ``state_dict``/``load_state_dict``: the
checkpoint stores every callback's state under its ``name``.

A callback stops the fit in one of two ways: ``loop.stop = True`` ends it after the epoch
(validated, logged and checkpointed: early stopping), ``raise CancelFit`` ends it at once,
mid-epoch included, with no validation (the LR finder's sweep). ``after_fit`` runs after both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import TransformedImages, iter_batches
from ..data.sources import DataSource, Sharding
from ..models.feature_cache import FeatureCache
from ..models.transfer import set_train_mode
from ..tasks.base import Task
from .distributed import Dist, gathered
from .step import TrainStep, predict_logits

log = logging.getLogger("resfit")


def _close(batches: Iterable[Any]) -> None:
    """Close a paused batch generator: its ``finally`` shuts its DataLoader workers down.
    Left to itself it would live on in the cycle the exception's frames make with the loop."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


class CancelFit(Exception):
    """Raised by a callback to end the fit now: the rest of the epoch, its validation and any
    later epochs are skipped; ``after_fit`` still runs (it restores what ``before_fit`` saved)."""


class Callback:
    """Override the events you need; ``order`` sorts callbacks (lower runs first)."""

    order: int = 50

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_fit(self, loop: Loop) -> None: ...
    def before_epoch(self, loop: Loop) -> None: ...
    def before_train(self, loop: Loop) -> None: ...
    def before_step(self, loop: Loop) -> None: ...
    def after_loss(self, loop: Loop) -> None: ...
    def after_step(self, loop: Loop) -> None: ...
    def after_train(self, loop: Loop) -> None: ...
    def after_epoch(self, loop: Loop) -> None: ...
    def after_fit(self, loop: Loop) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EpochData:
    """What the loop trains and validates on: decoded images behind their transforms."""

    train: TransformedImages  # random augmentation
    val: TransformedImages  # eval preprocessing
    train_eval: TransformedImages  # train images with eval preprocessing (precise BN)
    sample_weight: Tensor | None = None  # balanced draws with replacement (--balance sampler)


class Loop:
    """Holds the training state that callbacks read and change.

    ``model`` is the network whose weights are saved; ``net`` is what the step runs (the
    model, its DDP or compiled wrapper); ``eval_model`` is what validation scores and the run
    keeps (the model, or its EMA).
    """

    def __init__(
        self,
        model: nn.Module,
        net: nn.Module,
        step: TrainStep,
        task: Task,
        data: EpochData,
        source: DataSource,
        callbacks: Sequence[Callback],
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        dist: Dist,
        workers: int = 0,
        sharding: Sharding | None = None,
    ) -> None:
        self.model, self.net, self.eval_model = model, net, model
        self.step, self.task, self.data, self.source = step, task, data, source
        self.callbacks = sorted(callbacks, key=lambda c: c.order)
        self.epochs, self.seed, self.dist, self.workers = epochs, seed, dist, workers
        self.local_bs = max(1, batch_size // dist.world)
        self.global_bs = self.local_bs * dist.world
        # Which images this rank trains on, batch by batch (see sources.Sharding). A last
        # partial batch is dropped: a batch of one breaks BatchNorm, and equal batches keep
        # ranks in step.
        self.sharding = sharding or Sharding.plan(
            len(data.train), self.global_bs, dist.rank, dist.world, seed
        )
        self.steps_per_epoch = self.sharding.steps
        self.frozen: list[nn.Module] = []
        self.features: FeatureCache | None = None
        self.start_epoch, self.epoch, self.step_in_epoch = 0, 0, 0
        # Mid-epoch resume: the batches already done in start_epoch, with their running sums
        # and the random state after them (set by the checkpoint callback).
        self.start_step, self.first_step = 0, 0
        self.partial: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        # Sharded validation under torchrun: this rank's positions in the validation set
        # (its images are data.val); None when every rank holds all of it.
        self.val_ids: list[int] | None = None
        self.row: dict[str, float] = {}
        self.stop = self.improved = False
        self.batches: Iterable[tuple[Tensor, Tensor]] = ()
        # file -> {"file", "epochs", "error"} of the run's files whose last write failed
        self.not_saved: dict[str, dict[str, Any]] = {}
        self.step.on_loss = self._after_loss

    def event(self, name: str) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self)

    def _after_loss(self, loss: Tensor) -> None:
        self.loss = loss
        self.event("after_loss")

    def callback(self, kind: type) -> Any:
        """The callback of type ``kind``, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def try_write(self, path: Any, write: Callable[[], None]) -> bool:
        """Run ``write``, which writes ``path`` atomically. Any error (a full disk or a quota:
        torch raises RuntimeError, safetensors SafetensorError, Python OSError) is logged and
        noted in ``not_saved``, and training goes on: the previous file is intact."""
        try:
            write()
        except Exception as e:  # whatever the writer raises, the run is worth more than a file
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("could not write %s (%s); the previous one is intact, training goes on",
                      path, error)  # fmt: skip
            entry = self.not_saved.setdefault(str(path), {"file": str(path), "epochs": []})
            entry["epochs"].append(self.epoch + 1)
            entry["error"] = error
            return False
        self.not_saved.pop(str(path), None)  # a later write succeeded: the file is current
        return True

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> None:
        self.event("before_fit")
        try:
            self.fit_epochs()
        except CancelFit:
            pass  # a callback ended the fit mid-epoch (see CancelFit)
        self.event("after_fit")

    def fit_epochs(self) -> None:
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch, self.epoch_start = epoch, time.perf_counter()
            self.first_step = self.start_step if epoch == self.start_epoch else 0
            self.event("before_epoch")
            self.batches = source = self.epoch_batches()
            try:
                self.event("before_train")
                self.train_epoch()
            finally:  # an exception mid-epoch ends the DataLoader workers now, not at a GC
                self.batches = ()
                _close(source)
            self.event("after_train")
            self.row = self.validate()
            self.history.append(self.row)
            self.event("after_epoch")
            if self.stop:
                break

    def train_epoch(self) -> None:
        self.loss_sum = self.correct = self.seen = 0.0
        if self.first_step and self.partial:  # resumed mid-epoch: the sums so far
            p = self.partial
            self.loss_sum, self.correct, self.seen = p["loss_sum"], p["correct"], p["seen"]
            self.epoch_start -= p["elapsed"]
            torch.set_rng_state(p["rng"])  # the mixing draws continue where they stopped
        net = self.features.tail if self.features is not None else self.net
        for i, (x, y) in enumerate(self.batches, start=self.first_step):
            self.step_in_epoch, self.x, self.y, self.hard_y = i, x, y, y
            self.event("before_step")
            self.logits, self.loss = self.step(net, self.x, self.y)
            n = len(self.hard_y)
            self.loss_sum += self.loss.item() * n
            self.correct += self.task.count_correct(self.logits, self.hard_y)
            self.seen += n
            self.event("after_step")
        self.train_time = time.perf_counter() - self.epoch_start

    def epoch_batches(self) -> Iterable[tuple[Tensor, Tensor]]:
        """This epoch's batches: seeded by the epoch (not carried over from the last one), so a
        resumed run draws the same batches as an uninterrupted one; a run resumed mid-epoch
        starts at batch ``first_step``."""
        s = self.seed * 100_003
        torch.manual_seed(s + self.epoch * 7 + self.dist.rank)  # augmentation and mixing draws
        set_train_mode(self.model, self.frozen)
        index_batches = self.sharding.epoch(self.epoch, self.data.sample_weight)
        index_batches = index_batches[self.first_step : self.steps_per_epoch]
        if self.features is not None:
            views = torch.Generator().manual_seed(s + self.epoch + 77_777)
            return iter_batches(self.features.train_set(views), index_batches, 0)
        return self.source.batches(self.data.train, index_batches, self.workers,
                                   seed=s + self.epoch, first_step=self.first_step)  # fmt: skip

    def progress_state(self) -> dict[str, Any]:
        """Where the epoch stands after the current step: what a mid-epoch checkpoint keeps."""
        return {
            "step": self.step_in_epoch + 1,
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "seen": self.seen,
            "elapsed": time.perf_counter() - self.epoch_start,
            "rng": torch.get_rng_state(),
        }

    # -- evaluation -------------------------------------------------------------------------

    def eval_view(self, model: nn.Module) -> tuple[nn.Module, torch.utils.data.Dataset]:
        """The network and data validation runs: through the feature cache when there is one
        (the frozen prefix is the same in ``model``), else the whole model on images."""
        if self.features is not None:
            return self.features.tail_for(model), self.features.val_set()
        return model, self.data.val

    def val_logits(self, model: nn.Module | None = None) -> Tensor:
        net, dataset = self.eval_view(model if model is not None else self.eval_model)
        s = self.step
        return predict_logits(
            net, dataset, max(64, self.local_bs), s.device, s.precision, s.channels_last
        )

    def val_outputs(self, model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Logits and labels of the whole validation set. Under sharded validation each rank
        scores its share and the shares are gathered back into validation order, so every
        rank computes the metrics of the whole set, as one process would."""
        logits, labels = self.val_logits(model), self.data.val.decoded.labels
        if self.dist.world <= 1 or self.val_ids is None:
            return logits, labels
        parts = gathered([(self.val_ids, logits.cpu(), labels)], self.dist)
        ids = [i for part in parts for i in part[0]]
        order = torch.tensor(sorted(range(len(ids)), key=ids.__getitem__), dtype=torch.long)
        return torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]

    def validate(self) -> dict[str, float]:
        metrics = self.task.val_metrics(*self.val_outputs())
        seen = max(self.seen, 1)
        return {
            "epoch": self.epoch + 1,
            "lr": self.step.optimizer.param_groups[0]["lr"],
            "train_loss": self.loss_sum / seen,
            "train_acc": self.correct / seen,
            **metrics,
            "epoch_time_s": time.perf_counter() - self.epoch_start,
            "train_images_per_s": self.seen * self.dist.world / max(self.train_time, 1e-9),
        }

"""A training run from start to finish: resolve the config, find and decode the data, build
the model, the step and the callbacks, fit, then keep the best model with its calibration,
report and test score.

``train(data="DATA", out="RUN", ...)`` (``resfit train DATA --out RUN``) writes a run folder:

    RUN/config.json        resolved configuration (enough to reproduce the run)
    RUN/classes.json       class names, in label order
    RUN/splits.csv         every file with its label and split (train / val / test)
    RUN/model.safetensors  the best weights (by the task's validation score)
    RUN/metrics.csv        one row per epoch
    RUN/train.log          the log
    RUN/skipped.csv        files that could not be decoded, with the reason (stream mode
                           adds the files that fail during training)
    RUN/checkpoints/last.pt, best.safetensors   written atomically; ``--resume`` continues
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import runtime, threads
from ..core.config import TrainConfig
from ..core.errors import ConfigError, DataError, TrainingError
from ..core.windows import parse_window
from ..data.augmentation import batch_transform
from ..data.datasets import DecodedImages, TransformedImages
from ..data.discovery import write_splits
from ..data.paths import write_skipped
from ..data.preprocessing import base_size_for
from ..data.samples import DataSplits
from ..data.sources import DataSource, Sharding, get_source
from ..models import transfer
from ..runs import FileLog, RunPaths, write_config
from ..tasks.base import Task
from ..tasks.registry import TASKS
from .callbacks import BestModel, multilabel_mix
from .distributed import Dist, barrier, gathered, init_distributed, min_across_ranks
from .finish import eval_decode_size, finish_run
from .loop import Callback, EpochData, Loop
from .lr_auto import settle_lr
from .recipes import callbacks_for, log_recipe, param_groups_for
from .setup import (
    _choose_data_mode,
    _config_for,
    build_transforms,
    check_leakage,
    find_data,
    resolve,
    val_samples,
    warn_imbalance,
)
from .step import TrainStep, make_optimizer
from .teacher import check_teacher
from .tracking import check_tracker, tracked

log = logging.getLogger("resfit")

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    test: dict | None = None
    config: TrainConfig | None = field(default=None, repr=False)


def train(
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    **options: Any,
) -> TrainResult:
    """Train a classifier and write the run folder.

    Keyword ``options`` are flat option names (``resfit.train(data="DATA", out="RUN",
    arch="resnet20_cifar", epochs=5)``) applied on top of ``cfg``. ``resume=True`` continues
    the run in ``out``: options that may change mid-run (``epochs``, ``early_stopping``,
    ``progress`` ...) are applied, any other option given with a different value is refused.
    ``callbacks`` join the recipe's (a tuner's pruning report, for one). ``lr="auto"`` settles
    the rate by a short LR-finder sweep first (:func:`~resfit.training.lr_auto.settle_lr`).
    """
    if resume:
        if options.get("lr") == "auto":  # the run already chose its rate
            options.pop("lr")
        if cfg is not None and cfg.optim.lr == "auto":
            cfg = cfg.replace(lr=None)
        return _train(cfg, True, callbacks, options)
    cfg = (cfg or TrainConfig()).replace(**options)
    if cfg.optim.lr == "auto" and cfg.data.path:  # no data: _train's error says what is missing
        cfg = settle_lr(cfg)
    return _train(cfg, False, callbacks, {})


def _train(
    cfg: TrainConfig | None,
    resume: bool,
    callbacks: Sequence[Callback],
    options: dict[str, Any],
) -> TrainResult:
    """The run at a settled learning rate: the config, the process, then the run folder."""
    cfg = _config_for(cfg, resume, options)
    if cfg.runtime.threads is not None or not threads.is_configured():
        threads.configure(cfg.runtime.threads)  # the CLI has done it already
    out = Path(cfg.run.out)
    dist_info = init_distributed(cfg.runtime.device)
    device = runtime.pick_device(cfg.runtime.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    precision = runtime.pick_precision(device, cfg.runtime.precision)
    if precision == "int8":
        raise ConfigError(
            "--precision int8 is for inference (resfit export); train in fp32/bf16/fp16"
        )
    torch.manual_seed(cfg.runtime.seed)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    if dist_info.main:
        RunPaths(out).checkpoints.mkdir(parents=True, exist_ok=True)
    with FileLog(out, dist_info.main):  # from here on, the log is in the run
        return _prepare_and_run(cfg, device, precision, dist_info, resume, callbacks)


def _prepare_and_run(
    cfg: TrainConfig, device: torch.device, precision: str, dist_info: Dist, resume: bool,
    extra: Sequence[Callback] = (),
) -> TrainResult:  # fmt: skip
    out, main = Path(cfg.run.out), dist_info.main
    if cfg.run.track and main:  # a missing extra answers before the data is read
        check_tracker(cfg.run.track)
    splits = find_data(cfg)
    if resume and splits.classes != cfg.classes:
        raise TrainingError(f"--resume: the classes in {cfg.data.path} differ from those of {out}")
    check_teacher(cfg, splits)  # before the student is built or anything decoded
    cfg, model = resolve(cfg.replace(task=splits.task), splits)  # the run records its task
    cfg = _choose_data_mode(cfg, splits, dist_info)  # before anything is decoded
    duplicates = check_leakage(splits, cfg.data.leakage, cfg, model) if main or cfg.data.leakage == "remove" else []  # fmt: skip
    if cfg.run.audit and main:  # a missing extra answers now, not after the training
        from ..quality.label_issues import check_audit

        check_audit(
            splits.classes,
            [s.label for s in splits.train],
            f"the training split of {cfg.data.path}",
        )
    warn_imbalance(splits)
    if main:
        write_config(out, cfg.to_dict(), cfg.classes)
        write_splits(RunPaths(out).splits, splits)
    return _run(cfg, model, splits, device, precision, dist_info, resume, duplicates, extra)


def _open_data(
    cfg: TrainConfig,
    source: DataSource,
    splits: DataSplits,
    show: bool,
    dist_info: Dist,
    device: torch.device,
) -> tuple[DecodedImages, DecodedImages, list, Sharding]:
    """This rank's share of train and the val images, opened by ``source``, with the files
    that could not be read (listed in RUN/skipped.csv) and the sharding of the epochs."""
    out, main = Path(cfg.run.out), dist_info.main
    global_bs = max(1, cfg.optim.batch_size // dist_info.world) * dist_info.world
    sharding = Sharding.plan(len(splits.train), global_bs, dist_info.rank, dist_info.world,
                             cfg.runtime.seed)  # fmt: skip
    share = [splits.train[i] for i in sharding.ids]
    if dist_info.world > 1:
        log.info("rank %d opens %d of the %d training images", dist_info.rank,
                 len(set(sharding.ids)), len(splits.train))  # fmt: skip
    train_data = source.open(share, base_size_for(cfg.model.img_size), progress=show,
                             desc="decoding train")  # fmt: skip
    val_data = _open_val(cfg, source, splits, show, dist_info)
    if train_data.skipped:
        bad = {p for p, _ in train_data.skipped}
        sharding = sharding.drop({i for i in sharding.ids if str(splits.train[i].path) in bad})
    train_data.ids = sharding.ids
    steps = min_across_ranks(sharding.local_steps(), dist_info, device)
    sharding.steps = min(sharding.steps, steps, cfg.data.limit_train_batches or steps)
    skipped = splits.skipped + gathered(train_data.skipped, dist_info) + val_data.skipped
    if main:
        write_skipped(RunPaths(out).skipped, skipped)
        if skipped:
            log.warning("%d file(s) could not be read and were skipped: see %s", len(skipped),
                        RunPaths(out).skipped)  # fmt: skip
    barrier(dist_info)  # skipped.csv exists before any stream worker appends to it
    if steps == 0:
        raise DataError(f"no readable training images in {cfg.data.path}")
    if not min_across_ranks(len(val_data), dist_info, device):
        raise DataError(
            f"no validation images: add a val/ folder to {cfg.data.path} or raise --val-fraction"
        )
    return train_data, val_data, skipped, sharding


def _open_val(
    cfg: TrainConfig, source: DataSource, splits: DataSplits, show: bool, dist_info: Dist
) -> DecodedImages:
    """The validation images of this rank: under torchrun every world-th image from the rank's
    own (sharded validation, its positions in ``ids``), else all of them. Opened at the
    weights' own resize (torchvision V2: 232 for a 224 crop), if any."""
    samples = val_samples(cfg, splits.val)
    world = dist_info.world if len(samples) >= dist_info.world else 1
    ids = list(range(dist_info.rank % world, len(samples), world))
    val_data = source.open([samples[i] for i in ids], eval_decode_size(cfg), progress=show,
                           desc="decoding val")  # fmt: skip
    if world > 1:
        log.info("rank %d validates %d of the %d validation images", dist_info.rank, len(ids),
                 len(samples))  # fmt: skip
        bad = {p for p, _ in val_data.skipped}
        val_data.ids = [i for i in ids if str(samples[i].path) not in bad]
    return val_data


def _skipped_during_training(path: Path, before: list) -> list:
    """``before`` and the files that stream workers found broken during training (each once;
    RUN/skipped.csv is rewritten without the repeats)."""
    import csv

    from ..data.paths import open_csv

    if not path.exists():
        return before
    with open_csv(path) as f:
        rows = [tuple(r) for r in csv.reader(f)][1:]
    unique = list(dict.fromkeys(rows))
    if len(unique) != len(rows):
        write_skipped(path, unique)
    known = {p for p, _ in before}
    return before + [r for r in unique if r[0] not in known]


def _task(
    cfg: TrainConfig, all_labels: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> tuple[Task, Any]:
    """The run's task, built from the config and the labels (see ``Task.from_config``)."""
    return TASKS.get(cfg.data.task).from_config(cfg, all_labels, labels, device)


def _place(cfg: TrainConfig, model: nn.Module, device: torch.device, dist_info: Dist) -> nn.Module:
    """Freeze, convert BN for multi-GPU, move to the device and the memory layout."""
    # Frozen before the optimizer is built, so its groups leave the frozen part out; the freeze
    # schedule then sets each epoch's policy (and BN modes) on top.
    transfer.apply_freeze(model, cfg.transfer.freeze, cfg.transfer.train_bn)
    if cfg.runtime.sync_bn and dist_info.world > 1:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _wrap(cfg: TrainConfig, model: nn.Module, device: torch.device, dist_info: Dist) -> nn.Module:
    """What the step runs: DDP across ranks, compiled on request."""
    net: nn.Module = model
    if dist_info.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.transfer.recipe == "finetune",  # stages wait frozen at first
        )
    return torch.compile(net) if cfg.runtime.compile else net


def _run(
    cfg: TrainConfig,
    model: nn.Module,
    splits: DataSplits,
    device: torch.device,
    precision: str,
    dist_info: Dist,
    resume: bool,
    duplicates: list,
    extra: Sequence[Callback] = (),
) -> TrainResult:
    out, show = Path(cfg.run.out), cfg.run.progress and dist_info.main
    stream = {"skip_log": RunPaths(out).skipped} if cfg.data.data_mode in ("stream", "shards") else {}  # fmt: skip
    source = get_source(cfg.data.data_mode, window=parse_window(cfg.data.window), **stream)
    train_data, val_data, skipped, sharding = _open_data(cfg, source, splits, show, dist_info,
                                                         device)  # fmt: skip
    log.info(
        "%s: %d classes, %d train / %d val images, %s px, %s on %s",
        cfg.model.arch, len(cfg.classes), len(splits.train), len(val_data), cfg.model.img_size,
        cfg.model.weights or "random init", runtime.describe(device, precision),
    )  # fmt: skip
    if stream and not cfg.data.workers:
        log.info("stream mode decodes in this process: --workers N decodes in N processes")
    model = _place(cfg, model, device, dist_info)
    optimizer = make_optimizer(cfg.optim, param_groups_for(cfg, model), cfg.optim.lr)
    log_recipe(cfg, optimizer)
    net = _wrap(cfg, model, device, dist_info)
    tr_tf, ev_tf = build_transforms(cfg)
    coding = TASKS.get(cfg.data.task).coding
    all_labels = coding.targets([x.label for x in splits.train], len(cfg.classes))
    task, sample_weight = _task(cfg, all_labels, train_data.labels, device)
    data = EpochData(TransformedImages(train_data, tr_tf), TransformedImages(val_data, ev_tf),
                     TransformedImages(train_data, ev_tf), sample_weight)  # fmt: skip
    step = TrainStep(optimizer, task.loss, device, precision, cfg.runtime.channels_last,
                     cfg.optim.grad_clip)  # fmt: skip
    loop = Loop(model, net, step, task, data, source, [], epochs=cfg.optim.epochs,
                batch_size=cfg.optim.batch_size, seed=cfg.runtime.seed, dist=dist_info,
                workers=cfg.data.workers, sharding=sharding)  # fmt: skip
    # torchvision's MixUp/CutMix take class indices; float targets (label sets) mix as they are.
    k = len(cfg.classes)
    mix = multilabel_mix(cfg.augment) if coding.float_targets else batch_transform(cfg.augment, k)
    loop.callbacks = sorted(
        [*callbacks_for(cfg, loop, (tr_tf, ev_tf), mix, out, resume, precision, show), *extra],
        key=lambda c: c.order,
    )
    loop.val_ids = val_data.ids
    with tracked(loop):  # --track: the finished run folder goes to the tracker
        loop.fit()
        barrier(dist_info)
        best = loop.callback(BestModel)
        if dist_info.main and loop.val_ids is not None:  # rank 0 finishes on the whole val split
            whole = source.open(val_samples(cfg, splits.val), eval_decode_size(cfg),
                                progress=show, desc="decoding val")  # fmt: skip
            loop.data.val, loop.val_ids, loop.features = TransformedImages(whole, ev_tf), None, None
        result = TrainResult(out, loop.history, best.best_epoch, best.best, config=cfg)
        if dist_info.main:
            if stream:
                skipped = _skipped_during_training(RunPaths(out).skipped, skipped)
            result.test = finish_run(cfg, loop, splits, skipped, duplicates, ev_tf, show)
    return result

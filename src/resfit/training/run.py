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

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import runtime, threads, transfer
from ..adapters import adapt
from ..atomic import atomic_save_safetensors, atomic_write_text
from ..augmentation import (
    base_size_for,
    batch_transform,
    eval_transform,
    for_channels,
    train_transform,
)
from ..config import OPTIONS, TrainConfig, defaults_note, resume_changes
from ..data import (
    DataSplits,
    DecodedImages,
    TransformedImages,
    discover,
    write_skipped,
    write_splits,
)
from ..errors import ConfigError, DataError, TrainingError
from ..models import get_spec
from ..shards import is_prepared, read_splits
from ..sources import DataSource, Sharding, choose_mode, get_source
from ..tasks import MultiLabel, SingleLabel, Task
from ..weights import IMAGENET_MEAN, IMAGENET_STD, create_model
from .callbacks import BestModel, multilabel_mix
from .distributed import Dist, barrier, gathered, init_distributed, local_world, min_across_ranks
from .finish import eval_decode_size, finish_run
from .loop import Callback, EpochData, Loop
from .recipes import callbacks_for, log_recipe, param_groups_for
from .step import TrainStep, make_optimizer

log = logging.getLogger("resfit")


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
    ``callbacks`` join the recipe's (a tuner's pruning report, for one).
    """
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
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    with _FileLog(out / "train.log", dist_info.main):  # from here on, the log is in the run
        return _prepare_and_run(cfg, device, precision, dist_info, resume, callbacks)


def _prepare_and_run(
    cfg: TrainConfig, device: torch.device, precision: str, dist_info: Dist, resume: bool,
    extra: Sequence[Callback] = (),
) -> TrainResult:  # fmt: skip
    out, main = Path(cfg.run.out), dist_info.main
    splits = find_data(cfg)
    if resume and splits.classes != cfg.classes:
        raise TrainingError(f"--resume: the classes in {cfg.data.path} differ from those of {out}")
    cfg, model = resolve(cfg.replace(task=splits.task), splits)  # the run records its task
    cfg = _choose_data_mode(cfg, splits, dist_info)  # before anything is decoded
    duplicates = check_leakage(splits, cfg.data.leakage, cfg, model) if main or cfg.data.leakage == "remove" else []  # fmt: skip
    if cfg.run.audit and main:  # a missing extra answers now, not after the training
        from ..label_issues import check_audit

        check_audit(
            splits.classes,
            [s.label for s in splits.train],
            f"the training split of {cfg.data.path}",
        )
    warn_imbalance(splits)
    if main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        atomic_write_text(out / "classes.json", json.dumps(cfg.classes, indent=2))
        write_splits(out / "splits.csv", splits)
    return _run(cfg, model, splits, device, precision, dist_info, resume, duplicates, extra)


def find_data(cfg: TrainConfig) -> DataSplits:
    """The splits of the run's data: a folder written by ``resfit prepare`` (its index, no file
    read), else the folder layout or manifest that :func:`resfit.data.discover` finds."""
    if is_prepared(cfg.data.path):
        return read_splits(cfg.data.path, task=cfg.data.task)
    return discover(cfg.data.path, val_fraction=cfg.data.val_fraction,
                    test_fraction=cfg.data.test_fraction, seed=cfg.runtime.seed,
                    task=cfg.data.task)  # fmt: skip


def _choose_data_mode(cfg: TrainConfig, splits: DataSplits, dist_info: Dist) -> TrainConfig:
    """The config with ``--data-mode auto`` settled (memory or stream, logged with the
    reason); ``memory`` on data that will not fit stops here, before any decoding."""
    sizes = (base_size_for(cfg.model.img_size), eval_decode_size(cfg))
    choice = choose_mode(cfg.data.data_mode, splits.train, val_samples(cfg, splits.val),
                         sizes, dist_info.world, local_world(),
                         shards=is_prepared(cfg.data.path))  # fmt: skip
    log.info("data mode: %s (%s)", choice.mode, choice.reason)
    return cfg.replace(data_mode=choice.mode)


def val_samples(cfg: TrainConfig, val: list) -> list:
    """The validation samples, or with ``--limit-val-batches`` a seeded subset of them (val
    lists its files class by class: the first batches would be one class)."""
    limit = cfg.data.limit_val_batches
    n = limit * max(64, cfg.optim.batch_size) if limit else len(val)
    if n >= len(val):
        return val
    keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.runtime.seed))
    return [val[i] for i in sorted(keep[:n].tolist())]


def _config_for(cfg: TrainConfig | None, resume: bool, options: dict[str, Any]) -> TrainConfig:
    """The config to run: ``cfg`` with ``options``, or, resuming, the run's own with the
    options a resumed run may change."""
    if not resume:
        cfg = (cfg or TrainConfig()).replace(**options)
        out = Path(cfg.run.out)
        if (out / "checkpoints" / "last.pt").exists() or (out / "model.safetensors").exists():
            raise TrainingError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        if not cfg.data.path:
            raise ConfigError("no training data given: resfit train DATA --out RUN")
        return cfg.check()
    given = dict(options)
    if cfg is not None:  # the options of a config object that differ from the defaults
        defaults = TrainConfig()
        given = {n: cfg.get(n) for n in OPTIONS if cfg.get(n) != defaults.get(n)} | given
    out = Path(given.pop("out", None) or TrainConfig().run.out)
    config_path = out / "config.json"
    if not config_path.exists():
        raise TrainingError(f"--resume: {out} has no config.json; start the run without --resume")
    saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
    changes = resume_changes(saved, given)
    if changes:
        log.info("resuming with %s", ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items()))  # fmt: skip
    return saved.replace(**changes)


def resolve(cfg: TrainConfig, splits: DataSplits) -> tuple[TrainConfig, nn.Module]:
    """The model, and a config with the derived values (classes, preprocessing, size, lr)."""
    cfg.check()
    m = cfg.model
    model = create_model(m.arch, num_classes=None if m.weights else len(splits.classes),
                         weights=m.weights, in_chans=m.in_chans, progress=cfg.run.progress)  # fmt: skip
    pre = dict(getattr(model, "pretrained_cfg", {}) or {})
    if m.weights:
        pre.update(_known_file_preprocessing(Path(m.weights)) if not pre.get("categories") else {})
        pre.update(_run_preprocessing(Path(m.weights)))
        categories = list(pre.get("categories") or [])
        if categories == list(splits.classes):
            log.info("keeping the weights' %d-class head: its classes are yours", len(categories))
        else:
            # Transfer to other classes: the old head means nothing here, start it afresh.
            log.info("new %d-class head (the weights' head was for %d classes)",
                     len(splits.classes), adapt(model).num_classes)  # fmt: skip
            adapt(model).reset_head(len(splits.classes))
    pre["mean"], pre["std"] = pre.get("mean") or IMAGENET_MEAN, pre.get("std") or IMAGENET_STD
    resolved = cfg.resolve(splits.classes, pre, get_spec(m.arch).default_input_size)
    note = defaults_note(cfg, resolved)
    if note:
        log.info(note)
    return resolved, model


def _known_file_preprocessing(weights: Path) -> dict:
    """A local copy of registered weights (found by its sha256) carries the registry's
    categories and preprocessing, as the registered name would."""
    from ..weights import file_sha256, get_weights, list_weights

    if not weights.is_file() or weights.stat().st_size > 1 << 30:
        return {}
    digest = file_sha256(weights)
    for name in list_weights():
        spec = get_weights(name)
        if spec.sha256 and digest.startswith(spec.sha256):
            return {**spec.preprocessing(), "categories": list(spec.categories)}
    return {}


def _run_preprocessing(weights: Path) -> dict:
    """Weights saved by a resfit run carry their preprocessing and classes beside them."""
    folder = weights.parent
    if not weights.is_file() or not (folder / "config.json").is_file():
        return {}
    saved = json.loads((folder / "config.json").read_text())
    keys = ("mean", "std", "resize_size", "interpolation")
    return {"input_size": saved.get("img_size"), "categories": saved.get("classes"),
            **{k: saved[k] for k in keys if saved.get(k) is not None}}  # fmt: skip


def check_leakage(
    splits: DataSplits, mode: str, cfg: TrainConfig | None = None, model: nn.Module | None = None
) -> list:
    """Exact and near-duplicate images across train/val/test: reported, or removed from
    val/test (train keeps its copy) with ``mode="remove"``. With ``--leakage-signal both``
    (``cfg``), the embeddings of ``model`` (its ``--weights``, before training) find crops,
    rotations and mirror images too."""
    if mode == "off":
        return []
    from ..leakage import find_duplicates, remove_leaks

    groups = {name: [x.path for x in getattr(splits, name)]
              for name in ("train", "val", "test") if getattr(splits, name)}  # fmt: skip
    embedder = None
    if cfg is not None and cfg.data.leakage_signal == "both":
        embedder = _leakage_embedder(cfg, model)
    dups = find_duplicates(groups, embedder=embedder, known=splits.fingerprints)
    if dups:
        log.warning(
            "%d image(s) appear in more than one split (%s): scores on val/test are optimistic%s",
            len(dups), ", ".join(sorted({f"{d.split_a}/{d.split_b}" for d in dups})),
            "; removing them from val/test" if mode == "remove" else "; --leakage remove drops them",
        )  # fmt: skip
    if mode == "remove" and dups:
        _, dropped = remove_leaks(groups, dups)
        for name, paths in dropped.items():
            gone = set(paths)
            setattr(splits, name, [x for x in getattr(splits, name) if x.path not in gone])
    return dups


def _leakage_embedder(cfg: TrainConfig, model: nn.Module | None) -> Any:
    """The model as an embedder, at the run's evaluation preprocessing (it works on a copy)."""
    if not cfg.model.weights or model is None:
        raise ConfigError(
            "--leakage-signal both compares the embeddings of pretrained weights: give "
            "--weights (an untrained network's features say nothing about likeness)"
        )
    from ..augmentation import EvalPreprocessing
    from ..embed import Embedder

    pre = EvalPreprocessing.from_config(cfg.to_dict())
    return Embedder(model, pre, {"weights": cfg.model.weights}, precision="fp32")


def warn_imbalance(splits: DataSplits, ratio: float = 3.0) -> None:
    counts = splits.counts()["train"]
    lo, hi = min(counts.values()), max(counts.values())
    if lo and hi / lo >= ratio:
        log.warning(
            "classes are uneven in train (%d to %d images per class): consider --balance "
            "weights or --balance sampler, and read balanced accuracy and macro-F1", lo, hi,
        )  # fmt: skip


def build_transforms(cfg: TrainConfig) -> tuple:
    """(train, eval) per-image transforms for the config's size, statistics and channels."""
    p, m = cfg.pre, cfg.model
    tr = train_transform(cfg.augment, m.img_size, p.mean, p.std)
    ev = eval_transform(m.img_size, p.mean, p.std, resize_size=p.resize_size,
                        interpolation=p.interpolation)  # fmt: skip
    return for_channels(tr, m.in_chans), for_channels(ev, m.in_chans)


class _FileLog:
    """Send the resfit log to RUN/train.log for the duration of a run."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.handler = (
            logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
            if enabled
            else None
        )
        if self.handler:
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> _FileLog:
        if self.handler:
            log.addHandler(self.handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handler:
            log.removeHandler(self.handler)
            self.handler.close()


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
        write_skipped(out / "skipped.csv", skipped)
        if skipped:
            log.warning("%d file(s) could not be read and were skipped: see %s", len(skipped),
                        out / "skipped.csv")  # fmt: skip
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

    from ..data import open_csv

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
    """The task with its class weights (``--balance weights``), and the per-image draw weights
    (``--balance sampler``) of this rank's ``labels``; both from the whole split's
    ``all_labels``, so that every rank weighs a class the same."""
    if cfg.data.task == "multilabel":
        return _multilabel_task(cfg, all_labels, device), None
    counts = torch.bincount(all_labels, minlength=len(cfg.classes)).float()
    class_weight = None
    if cfg.data.balance == "weights":
        # Inverse-frequency weights, normalised so the average image weighs 1.
        class_weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    sample_weight = (1.0 / counts.clamp(min=1))[labels] if cfg.data.balance == "sampler" else None
    return SingleLabel(cfg.optim.label_smoothing, class_weight), sample_weight


def _multilabel_task(cfg: TrainConfig, targets: torch.Tensor, device: torch.device) -> Task:
    """Multi-label: ``--balance weights`` gives each class the positive weight negatives /
    positives (BCE's usual weighting: a rare label's misses cost as much as its absence)."""
    if cfg.data.balance == "sampler":
        raise ConfigError(
            "--balance sampler draws images by their class, and a multi-label image has "
            "several: use --balance weights (positive weights per class)"
        )
    pos_weight = None
    if cfg.data.balance == "weights":
        pos = targets.sum(0)
        pos_weight = ((len(targets) - pos) / pos.clamp(min=1)).clamp(min=1.0).to(device)
    return MultiLabel(cfg.optim.label_smoothing, pos_weight, cfg.optim.multilabel_loss)


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
    stream = cfg.data.data_mode in ("stream", "shards")
    source = get_source(cfg.data.data_mode, **({"skip_log": out / "skipped.csv"} if stream else {}))
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
    groups = param_groups_for(cfg, model)
    optimizer = make_optimizer(cfg.optim, groups, cfg.optim.lr)
    log_recipe(cfg, optimizer)
    net = _wrap(cfg, model, device, dist_info)
    tr_tf, ev_tf = build_transforms(cfg)
    all_labels = torch.tensor(
        [x.label for x in splits.train],
        dtype=torch.float32 if cfg.data.task == "multilabel" else torch.long,
    )
    task, sample_weight = _task(cfg, all_labels, train_data.labels, device)
    data = EpochData(TransformedImages(train_data, tr_tf), TransformedImages(val_data, ev_tf),
                     TransformedImages(train_data, ev_tf), sample_weight)  # fmt: skip
    step = TrainStep(optimizer, task.loss, device, precision, cfg.runtime.channels_last,
                     cfg.optim.grad_clip)  # fmt: skip
    loop = Loop(model, net, step, task, data, source, [], epochs=cfg.optim.epochs,
                batch_size=cfg.optim.batch_size, seed=cfg.runtime.seed, dist=dist_info,
                workers=cfg.data.workers, sharding=sharding)  # fmt: skip
    multi = cfg.data.task == "multilabel"  # torchvision's MixUp/CutMix take class indices
    mix = multilabel_mix(cfg.augment) if multi else batch_transform(cfg.augment, len(cfg.classes))
    loop.callbacks = sorted(
        [*callbacks_for(cfg, loop, (tr_tf, ev_tf), mix, out, resume, precision, show), *extra],
        key=lambda c: c.order,
    )
    loop.val_ids = val_data.ids
    loop.fit()
    barrier(dist_info)
    best = loop.callback(BestModel)
    if dist_info.main and loop.val_ids is not None:  # rank 0 finishes on the whole val split
        whole = source.open(val_samples(cfg, splits.val), eval_decode_size(cfg), progress=show,
                            desc="decoding val")  # fmt: skip
        loop.data.val, loop.val_ids, loop.features = TransformedImages(whole, ev_tf), None, None
    result = TrainResult(out, loop.history, best.best_epoch, best.best, config=cfg)
    if dist_info.main:
        if stream:
            skipped = _skipped_during_training(out / "skipped.csv", skipped)
        result.test = finish_run(cfg, loop, splits, skipped, duplicates, ev_tf, show)
    return result


__all__ = ["TrainResult", "atomic_save_safetensors", "build_transforms", "resolve", "train"]

"""Training: a flat loop over images decoded once, with the guards users expect.

``train(TrainConfig(...))`` (or ``resfit train DATA --out RUN``) writes a run folder:

    RUN/config.json        resolved configuration (enough to reproduce the run)
    RUN/classes.json       class names, in label order
    RUN/model.safetensors  the best weights (by validation accuracy)
    RUN/metrics.csv        one row per epoch
    RUN/train.log          the log
    RUN/skipped.csv        files that could not be decoded, with the reason
    RUN/checkpoints/last.pt, best.safetensors   written atomically; ``--resume`` continues

Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs as DistributedDataParallel: gloo on
CPU, NCCL on GPU, each rank taking its share of every global batch; rank 0 logs and writes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import runtime, transfer
from .augmentation import (
    AugmentConfig,
    base_size_for,
    batch_transform,
    eval_transform,
    for_channels,
    train_transform,
)
from .data import (
    DataSplits,
    DecodedImages,
    TransformedImages,
    decode_all,
    discover,
    iter_batches,
    write_skipped,
)
from .models import get_spec
from .weights import IMAGENET_MEAN, IMAGENET_STD, create_model

log = logging.getLogger("resfit")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
FREEZE_CHOICES = ("none", "stem", "layer1", "layer2", "layer3", "layer4", "backbone")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults work: only ``data`` and ``out`` are required."""

    data: str = ""
    out: str = "runs/run"
    arch: str = "resnet18"
    weights: str | None = None  # registered name, "pretrained", or a file
    in_chans: int = 3
    img_size: int | None = None  # None: the weights' input size, else 224 (32 for CIFAR nets)
    epochs: int = 20
    batch_size: int = 64  # global batch, split across ranks under torchrun
    optimizer: str = "sgd"
    lr: float | None = None  # None: a default for the optimizer and for transfer vs scratch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None: 5e-4 for SGD, 0 for Adam, 0.05 for AdamW
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None  # max global gradient norm
    early_stopping: int | None = None  # patience in epochs on validation accuracy
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    freeze: str = "none"
    train_bn: bool = False  # keep BatchNorm of the frozen part training (usually worse)
    recipe: str = "default"  # "finetune": head first (backbone frozen), then unfreeze
    head_epochs: int = 2  # finetune: epochs (of --epochs) that train only the head
    unfreeze: str = "all"  # finetune: "all" at once, or "gradual" (one stage per epoch)
    stem_lr_ratio: float = 0.1  # finetune: the stem's lr / the head's (geometric in between)
    cache: str = "auto"  # frozen-prefix feature cache: auto, memory, disk (RUN/cache), off
    cache_views: int = 4  # augmented views per image the cache stores (random augmentation)
    cache_dtype: str = "auto"  # fp32, fp16, bf16; auto: fp32 if small, else fp16
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    balance: str | None = None  # "weights" (loss) or "sampler" (draws) for uneven classes
    leakage: str = "report"  # duplicates across splits: "report", "remove" (from val/test), "off"
    report: bool = True  # write report.html (curves, per class, calibration, Grad-CAM)
    precise_bn: int = (
        2048  # re-estimate BN statistics on this many train images per epoch (0 = off)
    )
    workers: int = 0  # DataLoader workers for augmentation; 0 keeps both cores for the model
    tensorboard: bool = False
    progress: bool = True

    # -- derived, filled by resolve() --
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.augment, str):  # TrainConfig(augment="light") as a shorthand
            self.augment = AugmentConfig(preset=self.augment)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        aug = d.get("augment") or {}
        if isinstance(aug, dict):
            aug = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)

    def check(self) -> None:
        """Reject bad options with a message that names the option."""
        get_spec(self.arch)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}"
            )
        if self.balance not in (None, "weights", "sampler"):
            raise ValueError(f"--balance must be weights or sampler, not {self.balance!r}")
        if self.leakage not in ("report", "remove", "off"):
            raise ValueError(f"--leakage must be report, remove or off, not {self.leakage!r}")
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(
                f"--freeze must be one of {', '.join(FREEZE_CHOICES)}, not {self.freeze!r}"
            )
        for name, allowed in (
            ("recipe", transfer.RECIPES),
            ("unfreeze", transfer.UNFREEZE),
            ("cache", transfer.CACHE_CHOICES),
            ("cache_dtype", transfer.CACHE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                    f"not {getattr(self, name)!r}"
                )
        if self.cache_views < 1 or self.head_epochs < 0 or not 0 < self.stem_lr_ratio <= 1:
            raise ValueError(
                "--cache-views must be >= 1, --head-epochs >= 0 and --stem-lr-ratio in (0, 1]"
            )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("--lr must be positive")
        if self.img_size is not None and self.img_size < 8:
            raise ValueError("--img-size must be at least 8 pixels")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("--val-fraction and --test-fraction must be in [0, 1)")
        self.augment.resolved()


# ---------------------------------------------------------------------------------------------
# Small pieces


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash or a full disk never leaves a
    half-written checkpoint in place of the previous one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(
    state: dict[str, Tensor], path: Path, metadata: dict | None = None
) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def frozen_modules(model: nn.Module, freeze: str) -> list[nn.Module]:
    """The modules a freeze policy covers, in order: the stem, then stages up to ``freeze``."""
    if freeze == "none":
        return []
    stages = list(model.stage_names)
    if freeze == "backbone":
        upto = len(stages) - 1
    elif freeze in stages:
        upto = stages.index(freeze)
    else:
        raise ValueError(
            f"--freeze {freeze}: {type(model).__name__} has stages {', '.join(stages)} (or use backbone)"
        )
    mods: list[nn.Module] = []
    for name in stages[: upto + 1]:
        mods.extend([model.conv1, model.bn1] if name == "stem" else [getattr(model, name)])
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


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    n_images: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> None:
    """Re-estimate the running statistics of every BatchNorm that is training ("precise BN").

    With few images the weights move faster than BN's running averages (momentum 0.1) can
    follow: on a 48-image test set the network scored 100 % in train mode and 33-67 % in eval
    mode. One extra forward pass over up to ``n_images`` training images (eval preprocessing),
    with a cumulative average, makes eval mode see the statistics of the final weights.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if not bns or n_images <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    n = min(n_images, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    batches = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    for x, _ in iter_batches(dataset, [b for b in batches if len(b) > 1]):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            model(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def default_lr(cfg: TrainConfig) -> float:
    if cfg.optimizer == "sgd":
        base = 0.1 if cfg.weights is None else 0.01
        return base * cfg.batch_size / 256 * (2 if cfg.weights is None else 4)
    return 1e-3 if cfg.weights is None else 3e-4


def default_weight_decay(cfg: TrainConfig) -> float:
    return {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}[cfg.optimizer]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases: decaying them only hurts (they set scale and shift)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(cfg: TrainConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    if schedule == "onecycle":
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        frac = (step - peak) / max(1, total - peak)
        return 0.5 * (1 + math.cos(math.pi * frac)) * (1 - 1e-4) + 1e-4
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def soft_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float, class_weight: Tensor | None = None
) -> Tensor:
    """Cross-entropy for hard labels or MixUp/CutMix soft labels, with optional class weights."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, weight=class_weight, label_smoothing=smoothing)
    k = logits.shape[1]
    target = target * (1 - smoothing) + smoothing / k
    if class_weight is not None:
        target = target * class_weight
    return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    precision: str,
    channels_last: bool = True,
) -> Tensor:
    """Logits for every item of ``dataset`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    out = []
    n = len(dataset)
    for x, _ in iter_batches(
        dataset, [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    ):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


# ---------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best_val_accuracy: float
    test: dict | None = None


def resolve(cfg: TrainConfig, splits: DataSplits) -> tuple[TrainConfig, nn.Module]:
    """Fill the derived fields (classes, preprocessing, size) and build the model."""
    cfg.check()
    model = create_model(
        cfg.arch,
        num_classes=None if cfg.weights else len(splits.classes),
        weights=cfg.weights,
        in_chans=cfg.in_chans,
        progress=cfg.progress,
    )
    pre = dict(getattr(model, "pretrained_cfg", {}) or {})
    if cfg.weights:
        pre.update(_run_preprocessing(Path(cfg.weights)))
        if pre.get("categories") != list(splits.classes):
            # Transfer to other classes: the old head means nothing here, start it afresh.
            log.info(
                "new %d-class head (the weights' head was for %d classes)",
                len(splits.classes),
                model.fc.out_features,
            )
            model.reset_classifier(len(splits.classes))
    spec = get_spec(cfg.arch)
    cfg.img_size = cfg.img_size or pre.get("input_size") or spec.default_input_size
    mean = list(pre.get("mean") or IMAGENET_MEAN)
    std = list(pre.get("std") or IMAGENET_STD)
    if cfg.in_chans == 1:  # luminance input: the average of the RGB statistics
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    cfg.mean, cfg.std = mean, std
    cfg.classes = list(splits.classes)
    if cfg.lr is None:
        cfg.lr = default_lr(cfg)
    if cfg.weight_decay is None:
        cfg.weight_decay = default_weight_decay(cfg)
    return cfg, model


def check_leakage(splits: DataSplits, mode: str) -> list:
    """Exact and near-duplicate images across train/val/test: reported, or removed from
    val/test (train keeps its copy) with ``mode="remove"``."""
    if mode == "off":
        return []
    from .leakage import find_duplicates

    groups = {
        name: [x.path for x in getattr(splits, name)]
        for name in ("train", "val", "test")
        if getattr(splits, name)
    }
    dups = find_duplicates(groups)
    if dups:
        log.warning(
            "%d image(s) appear in more than one split (%s): scores on val/test are optimistic%s",
            len(dups),
            ", ".join(sorted({f"{d.split_a}/{d.split_b}" for d in dups})),
            "; removing them from val/test"
            if mode == "remove"
            else "; --leakage remove drops them",
        )
    if mode == "remove" and dups:
        from .leakage import remove_leaks

        _, dropped = remove_leaks(groups, dups)
        for name, paths in dropped.items():
            gone = set(paths)
            setattr(splits, name, [x for x in getattr(splits, name) if x.path not in gone])
    return dups


def warn_imbalance(splits: DataSplits, ratio: float = 3.0) -> None:
    counts = splits.counts()["train"]
    lo, hi = min(counts.values()), max(counts.values())
    if lo and hi / lo >= ratio:
        log.warning(
            "classes are uneven in train (%d to %d images per class): consider --balance "
            "weights or --balance sampler, and read balanced accuracy and macro-F1",
            lo,
            hi,
        )


def _run_preprocessing(weights: Path) -> dict:
    """Weights saved by a resfit run carry their preprocessing and classes beside them."""
    folder = weights.parent
    if not weights.is_file() or not (folder / "config.json").is_file():
        return {}
    cfg = json.loads((folder / "config.json").read_text())
    return {
        "input_size": cfg.get("img_size"),
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
        "categories": cfg.get("classes"),
    }


def build_transforms(cfg: TrainConfig) -> tuple:
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    tr = train_transform(cfg.augment, cfg.img_size, mean, std)
    ev = eval_transform(cfg.img_size, mean, std)
    return for_channels(tr, cfg.in_chans), for_channels(ev, cfg.in_chans)


class _FileLog:
    """Send the resfit log to RUN/train.log for the duration of a run."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.handler = logging.FileHandler(path) if enabled else None
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


def train(cfg: TrainConfig | None = None, *, resume: bool = False, **overrides) -> TrainResult:
    """Train a classifier and write the run folder. Keyword ``overrides`` set config fields, so
    ``resfit.train(data="DATA", out="RUN", arch="resnet20_cifar", epochs=5)`` works."""
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        if k == "augment" and isinstance(v, str):
            v = AugmentConfig(preset=v)
        if not hasattr(cfg, k):
            raise TypeError(f"train() got an unknown option {k!r}")
        setattr(cfg, k, v)
    out = Path(cfg.out)
    config_path = out / "config.json"
    last_path = out / "checkpoints" / "last.pt"
    if resume:
        if not config_path.exists():
            raise TrainingError(
                f"--resume: {out} has no config.json; start the run without --resume"
            )
        saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
        saved.progress = cfg.progress
        cfg = saved
    elif last_path.exists() or (out / "model.safetensors").exists():
        raise TrainingError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if not cfg.data:
        raise ValueError("no training data given: resfit train DATA --out RUN")

    dist_info = init_distributed(cfg.device)
    device = runtime.pick_device(cfg.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    precision = runtime.pick_precision(device, cfg.precision)
    if precision == "int8":
        raise ValueError(
            "--precision int8 is for inference (resfit export); train in fp32/bf16/fp16"
        )

    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    splits = discover(
        cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
    )
    if resume and splits.classes != cfg.classes:
        raise TrainingError(f"--resume: the classes in {cfg.data} differ from those of {out}")
    cfg, model = resolve(cfg, splits)
    duplicates = (
        check_leakage(splits, cfg.leakage) if dist_info.main or cfg.leakage == "remove" else []
    )
    warn_imbalance(splits)
    if dist_info.main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=2))
        atomic_write_text(out / "classes.json", json.dumps(cfg.classes, indent=2))

    with _FileLog(out / "train.log", dist_info.main):
        return _run(cfg, model, splits, device, precision, dist_info, resume, duplicates)


def _run(
    cfg: TrainConfig,
    model: nn.Module,
    splits: DataSplits,
    device: torch.device,
    precision: str,
    dist_info: Dist,
    resume: bool,
    duplicates: list | None = None,
) -> TrainResult:
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    last_path = out / "checkpoints" / "last.pt"
    best_path = out / "checkpoints" / "best.safetensors"
    show = cfg.progress and dist_info.main

    base = base_size_for(cfg.img_size)
    train_data = decode_all(splits.train, base, progress=show, desc="decoding train")
    val_data = decode_all(splits.val, base, progress=show, desc="decoding val")
    skipped = splits.skipped + train_data.skipped + val_data.skipped
    if dist_info.main:
        write_skipped(out / "skipped.csv", skipped)
        if skipped:
            log.warning(
                "%d file(s) could not be read and were skipped: see %s",
                len(skipped),
                out / "skipped.csv",
            )
    if len(train_data) == 0:
        raise TrainingError(f"no readable training images in {cfg.data}")
    if len(val_data) == 0:
        raise TrainingError(
            f"no validation images: add a val/ folder to {cfg.data} or raise --val-fraction"
        )
    log.info(
        "%s: %d classes, %d train / %d val images, %s px, %s on %s",
        cfg.arch, len(cfg.classes), len(train_data), len(val_data), cfg.img_size,
        cfg.weights or "random init", runtime.describe(device, precision),
    )  # fmt: skip

    frozen = apply_freeze(model, cfg.freeze, cfg.train_bn)
    if cfg.sync_bn and dist_info.world > 1:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.recipe == "finetune":
        # One group per stage with its own peak lr; frozen-for-now groups get no gradient.
        groups = transfer.discriminative_groups(model, cfg.weight_decay, cfg.lr, cfg.stem_lr_ratio)
    else:
        groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError(f"--freeze {cfg.freeze} leaves nothing to train")
    optimizer = make_optimizer(cfg, groups, cfg.lr)
    for g in optimizer.param_groups:
        g.setdefault("peak_lr", cfg.lr)
    schedule = transfer.freeze_schedule(cfg, model.stage_names)
    if cfg.recipe == "finetune":
        log.info(
            "finetune: %d epoch(s) head only, then --freeze %s (%s), peak lr %s",
            min(cfg.head_epochs, cfg.epochs), cfg.freeze, cfg.unfreeze,
            ", ".join(f"{k} {v:.2g}" for k, v in {g["stage"]: g["peak_lr"] for g in groups}.items()),
        )  # fmt: skip

    history: list[dict] = []
    start_epoch, best_acc, best_epoch = 0, -1.0, 0
    if resume and last_path.exists():
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, best_acc, best_epoch = ck["epoch"], ck["best_acc"], ck["best_epoch"]
        history = ck["history"]
        log.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.epochs)
    if start_epoch >= cfg.epochs:
        log.info("%s already finished its %d epochs", out, cfg.epochs)

    train_model: nn.Module = model
    if dist_info.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.recipe == "finetune",  # stages wait frozen at first
        )
    step_model = torch.compile(train_model) if cfg.compile else train_model

    tr_tf, ev_tf = build_transforms(cfg)
    mix = batch_transform(cfg.augment, len(cfg.classes))
    train_set = TransformedImages(train_data, tr_tf)
    val_set = TransformedImages(val_data, ev_tf)
    n = len(train_set)
    local_bs = max(1, cfg.batch_size // dist_info.world)
    global_bs = local_bs * dist_info.world
    # Drop a last partial batch: a batch of one breaks BatchNorm, and equal batches keep ranks in step.
    steps_per_epoch = max(1, n // global_bs) if n >= global_bs else 1
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    writer = None
    if cfg.tensorboard and dist_info.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "--tensorboard needs the tensorboard package: pip install tensorboard"
            ) from None
        writer = SummaryWriter(str(out / "tensorboard"))

    counts = torch.bincount(train_data.labels, minlength=len(cfg.classes)).float()
    class_weight = None
    if cfg.balance == "weights":
        # Inverse-frequency weights, normalised so the average image weighs 1.
        class_weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    sample_weight = (
        (1.0 / counts.clamp(min=1))[train_data.labels] if cfg.balance == "sampler" else None
    )

    patience_left = cfg.early_stopping
    policy, feats = None, None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if schedule[epoch] != policy:
            # The freeze policy of this stretch of epochs, and its feature cache if one pays.
            policy = schedule[epoch]
            frozen = transfer.refreeze(model, policy, cfg.train_bn)
            left = next((i for i, p in enumerate(schedule[epoch:]) if p != policy), None)
            feats = transfer.prepare_cache(
                cfg, model, policy, left or cfg.epochs - epoch, train_data, val_data, tr_tf,
                ev_tf, mix is not None, dist_info.world, device, precision, out, show,
            )  # fmt: skip
            if cfg.recipe == "finetune":
                log.info("epoch %d: --freeze %s", epoch + 1, policy)
        phase_start, phase_epochs, phase_scale = transfer.lr_phase(cfg, epoch)
        total_steps = phase_epochs * steps_per_epoch
        # Seeded per epoch (not carried from the last one) so a resumed run draws the same batches.
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch * 7 + dist_info.rank)
        if sample_weight is not None:  # balanced draws, with replacement
            perm = torch.multinomial(sample_weight, n, replacement=True, generator=g)
        else:
            perm = torch.randperm(n, generator=g)
        if n < global_bs:
            perm = perm[torch.arange(global_bs) % n]  # tiny data: repeat to fill one batch
        set_train_mode(model, frozen)
        loss_sum = correct = seen = 0.0
        index_batches = [
            perm[i * global_bs : (i + 1) * global_bs][
                dist_info.rank * local_bs : (dist_info.rank + 1) * local_bs
            ]
            for i in range(steps_per_epoch)
        ]
        epoch_set, epoch_model, workers = train_set, step_model, cfg.workers
        if feats is not None:
            views = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 77_777)
            epoch_set, epoch_model, workers = feats.train_set(views), feats.tail, 0
        bar = tqdm(
            iter_batches(epoch_set, index_batches, workers),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not show,
            leave=False,
        )
        for step_in_epoch, (x, y) in enumerate(bar):
            step = (epoch - phase_start) * steps_per_epoch + step_in_epoch
            mult = lr_at(step, total_steps, warmup, cfg.schedule) * phase_scale
            for grp in optimizer.param_groups:
                grp["lr"] = grp["peak_lr"] * mult
            hard_y = y
            if mix is not None and len(y) > 1:
                x, y = mix(x, y)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast(device, precision):
                logits = epoch_model(x)
            loss = soft_cross_entropy(logits.float(), y, cfg.label_smoothing, class_weight)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch + 1}: "
                    f"training stopped. The last good checkpoint is {last_path}"
                    f"{'' if last_path.exists() else ' (none yet)'}. Try a lower --lr (now {cfg.lr:g}) "
                    f"or --grad-clip 1.0."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            bs = len(hard_y)
            loss_sum += loss.item() * bs
            correct += (logits.argmax(1).cpu() == hard_y).sum().item()
            seen += bs
            if show:
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}"
                )
        train_time = time.perf_counter() - t0
        if cfg.precise_bn:
            recompute_bn_stats(
                feats.tail if feats else model,
                feats.bn_set() if feats else TransformedImages(train_data, ev_tf),
                cfg.precise_bn,
                max(local_bs, 32),
                device,
                precision,
                cfg.channels_last,
            )

        val_logits = predict_logits(
            feats.tail if feats else model,
            feats.val_set() if feats else val_set,
            max(64, local_bs),
            device,
            precision,
            cfg.channels_last,
        )
        val_y = val_data.labels
        val_loss = F.cross_entropy(val_logits, val_y).item()
        val_acc = (val_logits.argmax(1) == val_y).float().mean().item()
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "epoch_time_s": time.perf_counter() - t0,
            "train_images_per_s": seen * dist_info.world / max(train_time, 1e-9),
        }
        history.append(row)
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch + 1
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.1fs (%.0f img/s)%s",
            epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], val_loss, val_acc,
            row["epoch_time_s"], row["train_images_per_s"], "  *best*" if improved else "",
        )  # fmt: skip
        if dist_info.main:
            _write_metrics(out / "metrics.csv", history)
            if writer:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
            try:
                if improved:
                    atomic_save_safetensors(model.state_dict(), best_path)
                atomic_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "best_acc": best_acc,
                        "best_epoch": best_epoch,
                        "history": history,
                    },
                    last_path,
                )
            except OSError as e:
                # The previous checkpoint is intact (atomic write); keep training.
                log.error(
                    "could not write a checkpoint in %s (%s); the previous one is intact",
                    last_path.parent,
                    e,
                )
        if cfg.early_stopping is not None:
            patience_left = cfg.early_stopping if improved else patience_left - 1
            if patience_left <= 0:
                log.info(
                    "early stopping: no better validation accuracy for %d epochs",
                    cfg.early_stopping,
                )
                break

    if writer:
        writer.close()
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    result = TrainResult(out, history, best_epoch, best_acc)
    if dist_info.main:
        if best_path.exists():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(best_path)))
        atomic_save_safetensors(
            model.state_dict(),
            out / "model.safetensors",
            {"arch": cfg.arch, "epoch": str(best_epoch)},
        )
        # The frozen prefix is the same in the best weights: cached val features still hold.
        val_logits = predict_logits(
            feats.tail if feats else model,
            feats.val_set() if feats else val_set,
            64,
            device,
            precision,
            cfg.channels_last,
        )
        temperature = _calibrate(out, val_logits, val_data.labels)
        if cfg.report:
            _write_train_report(
                cfg,
                model,
                splits,
                val_data,
                val_logits,
                history,
                temperature,
                skipped,
                duplicates or [],
                ev_tf,
                device,
            )
        if splits.test:
            result.test = _evaluate_test(
                cfg, model, splits, base, ev_tf, device, precision, show, temperature
            )
        atomic_write_text(
            out / "summary.json",
            json.dumps(
                {
                    "best_epoch": best_epoch,
                    "best_val_accuracy": best_acc,
                    "epochs_run": len(history),
                    "test": result.test,
                },
                indent=2,
            ),
        )
        log.info(
            "best validation accuracy %.4f at epoch %d; run saved in %s", best_acc, best_epoch, out
        )
    return result


def _calibrate(out: Path, val_logits: Tensor, val_labels: Tensor) -> float:
    """Temperature scaling fitted on the validation set; ``predict`` applies it."""
    from .calibration import expected_calibration_error, fit_temperature, softmax

    t = fit_temperature(val_logits, val_labels)
    y = val_labels.numpy()
    ece = {
        "ece_before": expected_calibration_error(softmax(val_logits.numpy(), 1.0), y),
        "ece_after": expected_calibration_error(softmax(val_logits.numpy(), t), y),
    }
    atomic_write_text(
        out / "calibration.json",
        json.dumps({"temperature": t, "fitted_on": "validation", **ece}, indent=2),
    )
    log.info(
        "temperature %.3f fitted on validation: ECE %.4f -> %.4f",
        t,
        ece["ece_before"],
        ece["ece_after"],
    )
    return t


def _write_train_report(
    cfg,
    model,
    splits,
    val_data,
    val_logits,
    history,
    temperature,
    skipped,
    duplicates,
    ev_tf,
    device,
) -> None:
    from .inference import make_explainer
    from .report import ReportData, write_report

    data = ReportData(
        title=f"{cfg.arch} on {Path(cfg.data).name}: validation",
        class_names=cfg.classes,
        y_true=val_data.labels.numpy(),
        logits=val_logits.numpy(),
        paths=[str(p) for p in val_data.paths],
        history=history,
        config=cfg.to_dict(),
        temperature=temperature,
        data_summary={"counts": splits.counts(), "skipped": skipped, "duplicates": duplicates},
        explain=make_explainer(model, cfg.img_size, ev_tf, device),
        split="validation",
    )
    path = write_report(Path(cfg.out) / "report.html", data)
    log.info("report: %s", path)


def _evaluate_test(
    cfg, model, splits, base, ev_tf, device, precision, show, temperature=None
) -> dict:
    from .evaluation import compute_metrics, write_eval

    test_data: DecodedImages = decode_all(splits.test, base, progress=show, desc="decoding test")
    logits = predict_logits(
        model, TransformedImages(test_data, ev_tf), 64, device, precision, cfg.channels_last
    )
    res = compute_metrics(logits, test_data.labels, cfg.classes, [str(p) for p in test_data.paths])
    write_eval(res, Path(cfg.out) / "eval-test", temperature)
    log.info("test accuracy %.4f on %d images", res.accuracy, res.n)
    return {"accuracy": res.accuracy, "n": res.n, "top5": res.top5}


def _write_metrics(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)

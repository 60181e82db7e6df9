"""The frozen-prefix feature cache: a frozen prefix (eval mode, no gradient) computes the same
function in every epoch, so its output is computed once per image and the rest of the network
trains from the stored tensors. With random augmentation it stores a bank of ``cache_views``
augmented views per image and draws one per image per epoch. The plan (which stage, what
dtype, whether it fits the memory budget) is logged with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core import runtime
from ..core.atomic import atomic_commit, temp_path
from ..core.config import TrainConfig
from ..core.errors import ConfigError
from ..core.hashing import update_with_weights
from ..data.datasets import DecodedImages, TransformedImages, iter_batches
from .adapters import adapt
from .transfer import CACHE_VERSION, NP_DTYPES, TORCH_DTYPES, frozen_modules

log = logging.getLogger("resfit")


# ---------------------------------------------------------------------------------------------
# The frozen-prefix feature cache


class Tail(nn.Module):
    """The trainable rest of the network, fed with the cached output of ``stage``."""

    def __init__(self, model: nn.Module, stage: str) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.adapter = adapt(model)

    def forward(self, h: Tensor) -> Tensor:
        return self.adapter.forward_from(h, self.stage)


class CachedFeatures(torch.utils.data.Dataset):
    """Rows of a (N, K, ...) feature store; ``view[i]`` picks image i's view (default 0)."""

    def __init__(self, store: Tensor, labels: Tensor, view: Tensor | None = None) -> None:
        self.store, self.labels, self.view = store, labels, view

    def __len__(self) -> int:
        return self.store.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        v = int(self.view[i]) if self.view is not None else 0
        return self.store[i, v].float(), self.labels[i]


@dataclass
class FeatureCache:
    """Cached outputs of a frozen prefix for train (``views`` per image) and val images."""

    stage: str
    pooled: bool  # stored after global pooling: the whole backbone is frozen
    views: int
    train: Tensor  # (N, views, C, H, W)
    val: Tensor  # (M, 1, C, H, W)
    train_labels: Tensor
    val_labels: Tensor
    tail: Tail
    bn: Tensor | None = None  # eval-view train features for precise BN, when they differ

    def train_set(self, generator: torch.Generator) -> CachedFeatures:
        """This epoch's training set: one random view per image (none drawn when K = 1)."""
        view = None
        if self.views > 1:
            view = torch.randint(self.views, (len(self.train_labels),), generator=generator)
        return CachedFeatures(self.train, self.train_labels, view)

    def tail_for(self, model: nn.Module) -> Tail:
        """The trainable rest of ``model`` (the training weights or their average) on these
        features: the frozen prefix is the same in both."""
        return Tail(model, self.stage)

    def val_set(self) -> CachedFeatures:
        return CachedFeatures(self.val, self.val_labels)

    def bn_set(self) -> CachedFeatures:
        store = self.bn if self.bn is not None else self.train
        return CachedFeatures(store, self.train_labels[: store.shape[0]])


def cache_stage(model: nn.Module, policy: str) -> tuple[str, bool]:
    """The stage whose output is cached under a freeze policy, and whether it is pooled."""
    if policy == "backbone":
        return adapt(model).stage_names[-1], True
    return policy, False


def cache_key(
    model: nn.Module,
    policy: str,
    paths: list[Path],
    meta: dict,
) -> str:
    """sha256 of everything a cached tensor depends on: the frozen prefix's weights and BN
    statistics, the preprocessing and augmentation (in ``meta``), and every file's path, size
    and modification time. Any change gives another key, so a stale cache is never read."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, **meta}, sort_keys=True).encode())
    for m in frozen_modules(model, policy):
        update_with_weights(h, m.state_dict())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def memory_budget() -> int:
    """Bytes a cache may take in memory: half of what the system has available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2 * 1024**3


def _allocate(
    shape: tuple[int, ...], dtype: str, path: Path | None
) -> tuple[Tensor, np.memmap | None]:
    if path is None:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype]), None
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=NP_DTYPES[dtype], shape=shape)
    t = torch.from_numpy(arr)
    return (t.view(torch.bfloat16) if dtype == "bf16" else t), arr


def _open(path: Path, dtype: str) -> Tensor:
    arr = np.load(path, mmap_mode="r+")
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bf16" else t


@torch.inference_mode()
def compute_features(
    model: nn.Module,
    stage: str,
    pooled: bool,
    data: DecodedImages,
    transform: Callable[[Tensor], Tensor],
    views: int,
    seed: int,
    dtype: str,
    path: Path | None,
    device: torch.device,
    precision: str,
    channels_last: bool,
    batch_size: int = 64,
    desc: str = "caching",
    progress: bool = False,
) -> Tensor:
    """Run the prefix up to ``stage`` over every image ``views`` times (view v seeded by
    ``seed`` and v) and store the outputs, in memory or in a .npy memory map at ``path``."""
    from ..core.progress import progress_bar

    was_training = model.training
    model.eval()
    adapter = adapt(model)
    dataset = TransformedImages(data, transform)
    n = len(dataset)
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    store: Tensor | None = None
    mapped: np.memmap | None = None
    tmp = temp_path(path) if path is not None else None
    bar = progress_bar(total=n * views, desc=desc, enabled=progress)
    try:
        for v in range(views):
            torch.manual_seed(seed * 1_000_003 + v)  # the random transforms draw from this
            for idx, (x, _) in zip(batches, iter_batches(dataset, batches), strict=True):
                x = x.to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with runtime.autocast(device, precision):
                    h = adapter.forward_to(x, stage)
                    if pooled:  # kept N x C x 1 x 1: forward_from's pooling is then the identity
                        h = adapter.pool(h)[:, :, None, None]
                h = h.float().cpu()
                if store is None:
                    store, mapped = _allocate((n, views, *h.shape[1:]), dtype, tmp)
                if dtype != "fp32" and h.abs().max() > torch.finfo(TORCH_DTYPES[dtype]).max:
                    raise ConfigError(
                        f"cached features exceed the {dtype} range: use --cache-dtype fp32 or bf16"
                    )
                store[idx.start : idx.stop, v] = h
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    assert store is not None
    if path is not None and tmp is not None and mapped is not None:
        mapped.flush()  # complete on disk before the rename makes it visible to later runs
        atomic_commit(tmp, path)
        store = _open(path, dtype)
    return store


@dataclass(frozen=True)
class _CachePlan:
    """What a feature cache stores and where, decided before anything is computed."""

    policy: str
    stage: str
    pooled: bool
    views: int
    dtype: str
    where: str  # memory | disk
    total_bytes: int
    folder: Path
    meta: dict


def _refusal(
    cfg: TrainConfig, policy: str, epochs_left: int, mixing: bool, world: int
) -> str | None:
    """Why no cache would be right here, or None."""
    if cfg.transfer.train_bn:
        return "--train-bn keeps BatchNorm of the frozen part training, so it is not fixed"
    if world > 1:
        return "not under torchrun (each rank would compute every image)"
    if mixing:
        return "MixUp/CutMix mix the input images, which mixing features would not match"
    views = _views(cfg)
    if cfg.transfer.cache == "auto" and views >= epochs_left:
        return (
            f"{views} view(s) per image cost as much as the {epochs_left} epoch(s) left at "
            f"--freeze {policy}"
        )
    return None


def _views(cfg: TrainConfig) -> int:
    return cfg.transfer.cache_views if cfg.augment.resolved().preset != "none" else 1


def _plan(
    cfg: TrainConfig, model: nn.Module, policy: str, n_train: int, n_val: int, base_size: int,
    device: torch.device, precision: str, run_dir: Path,
) -> _CachePlan:  # fmt: skip
    stage, pooled = cache_stage(model, policy)
    with torch.inference_mode():  # the shape of one cached tensor, from a dummy batch
        was = model.training
        model.eval()
        m = cfg.model
        h = adapt(model).forward_to(
            torch.zeros(1, m.in_chans, m.img_size, m.img_size, device=device), stage
        )
        model.train(was)
    views = _views(cfg)
    per = (h.shape[1] if pooled else h[0].numel()) * 4
    budget = memory_budget()
    dtype = cfg.transfer.cache_dtype
    if dtype == "auto":
        # fp16 halves the cache for a relative error of 5e-4; pooled features are small anyway.
        dtype = "fp32" if pooled or per * (n_train * views + n_val) <= budget // 4 else "fp16"
    total = int(per * (1 if dtype == "fp32" else 0.5) * (n_train * views + n_val))
    mode = cfg.transfer.cache
    where = mode if mode != "auto" else ("memory" if total <= budget else "disk")
    meta = {
        "arch": m.arch, "policy": policy, "stage": stage, "pooled": pooled,
        "img_size": m.img_size, "base_size": base_size, "mean": list(cfg.pre.mean),
        "std": list(cfg.pre.std), "in_chans": m.in_chans, "precision": precision, "dtype": dtype,
    }  # fmt: skip
    return _CachePlan(policy, stage, pooled, views, dtype, where, total, run_dir / "cache", meta)


def _stored(
    plan: _CachePlan, cfg: TrainConfig, model: nn.Module, kind: str, data: DecodedImages,
    tf: Callable, n_views: int, aug: dict | None, device: torch.device, precision: str, show: bool,
) -> Tensor:  # fmt: skip
    """One store of the cache (train, val or bn): reused from disk when its key matches."""
    meta = {**plan.meta, "kind": kind, "views": n_views, "augment": aug}
    if aug is not None:
        meta["seed"] = cfg.runtime.seed
    key = cache_key(model, plan.policy, list(data.paths), meta)
    path = None
    if plan.where == "disk":
        plan.folder.mkdir(parents=True, exist_ok=True)
        path = plan.folder / f"{kind}-{plan.stage}-{key[:24]}.npy"
        for old in plan.folder.glob(f"{kind}-*.npy"):
            if old != path:  # another key: the weights, preprocessing or files changed
                log.info("feature cache: removing stale %s", old.name)
                old.unlink()
        if path.exists():
            log.info("feature cache: reusing %s", path)
            return _open(path, plan.dtype)
    return compute_features(
        model, plan.stage, plan.pooled, data, tf, n_views, cfg.runtime.seed, plan.dtype, path,
        device, precision, cfg.runtime.channels_last, max(cfg.optim.batch_size, 32),
        f"caching {kind} {plan.stage}", show,
    )  # fmt: skip


def _log_plan(plan: _CachePlan, n_train: int, n_val: int, epochs_left: int) -> None:
    log.info(
        "feature cache: --freeze %s, %s output of %d train x %d view(s) + %d val images, "
        "%s, %.0f MB in %s%s",
        plan.policy, f"pooled {plan.stage}" if plan.pooled else plan.stage, n_train, plan.views,
        n_val, plan.dtype, plan.total_bytes / 1e6, plan.where,
        f" ({plan.folder})" if plan.where == "disk" else "",
    )  # fmt: skip
    if plan.views > 1:
        log.info(
            "feature cache trade-off: the frozen layers run %d times per image instead of %d "
            "(%.1fx less work), but training sees only %d fixed augmented views of each image "
            "instead of a new one every epoch: less regularisation on small data. Raise "
            "--cache-views, or use --cache off for fresh augmentation every epoch.",
            plan.views, epochs_left, epochs_left / plan.views, plan.views,
        )  # fmt: skip


def _trains_bn(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and p.requires_grad
        for m in model.modules()
        for p in m.parameters(recurse=False)
    )


def prepare_cache(
    cfg: TrainConfig,
    model: nn.Module,
    policy: str,
    epochs_left: int,
    train_data: DecodedImages,
    val_data: DecodedImages,
    tr_tf: Callable[[Tensor], Tensor],
    ev_tf: Callable[[Tensor], Tensor],
    mixing: bool,
    world: int,
    device: torch.device,
    precision: str,
    run_dir: Path,
    show: bool = False,
) -> FeatureCache | None:
    """The feature cache for ``policy``, or None where it is off, would change the training
    without being asked for, or would save nothing. Logs the decision."""
    mode = cfg.transfer.cache
    if mode == "off" or policy == "none":
        return None
    reason = _refusal(cfg, policy, epochs_left, mixing, world)
    if reason is not None:
        if mode != "auto":
            raise ConfigError(f"--cache {mode}: {reason}")
        log.info("feature cache off: %s", reason)
        return None
    plan = _plan(cfg, model, policy, len(train_data), len(val_data), train_data.base_size,
                 device, precision, run_dir)  # fmt: skip
    random_aug = cfg.augment.resolved().preset != "none"

    def stored(kind, data, tf, n_views, aug):
        return _stored(plan, cfg, model, kind, data, tf, n_views, aug, device, precision, show)

    aug_meta = cfg.augment.to_dict() if random_aug else None
    train = stored("train", train_data, tr_tf if random_aug else ev_tf, plan.views, aug_meta)
    val = stored("val", val_data, ev_tf, 1, None)
    bn = None
    if random_aug and cfg.run.precise_bn and _trains_bn(model) and not plan.pooled:
        # Precise BN estimates statistics on eval-view images: cache those too (a subset).
        n = min(cfg.run.precise_bn, len(train_data))
        sub = DecodedImages(
            train_data.images[:n], train_data.labels[:n], train_data.paths[:n], [],
            train_data.base_size,
        )  # fmt: skip
        bn = stored("bn", sub, ev_tf, 1, None)
    _log_plan(plan, len(train_data), len(val_data), epochs_left)
    return FeatureCache(plan.stage, plan.pooled, plan.views, train, val, train_data.labels,
                        val_data.labels, Tail(model, plan.stage), bn)  # fmt: skip

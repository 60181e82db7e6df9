"""Before the loop: find the data, resolve the configuration against it (sizes, defaults,
preprocessing of the weights), check the splits for leakage, warn on imbalance and build the
transforms. Everything a run decides before its first batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import OPTIONS, TrainConfig
from ..core.defaults import defaults_note, resolve_config
from ..core.errors import ConfigError, TrainingError
from ..core.hashing import file_sha256
from ..core.resume import resume_changes
from ..data.augmentation import eval_transform, train_transform
from ..data.discovery import discover
from ..data.preprocessing import base_size_for, for_channels
from ..data.samples import DataSplits
from ..data.shards import is_prepared, read_splits, shard_window
from ..data.sources import choose_mode
from ..models.adapters import adapt
from ..models.resnet import get_spec
from ..models.weights import IMAGENET_MEAN, IMAGENET_STD, create_model
from ..runs import RunPaths, read_saved_config
from .distributed import Dist, local_world
from .finish import eval_decode_size

log = logging.getLogger("resfit")

__all__ = ["build_transforms", "resolve"]


def find_data(cfg: TrainConfig) -> DataSplits:
    """The splits of the run's data: a folder written by ``resfit prepare`` (its index, no file
    read), else the folder layout or manifest that :func:`resfit.data.discovery.discover` finds."""
    if is_prepared(cfg.data.path):
        return read_splits(cfg.data.path, task=cfg.data.task)
    return discover(cfg.data.path, val_fraction=cfg.data.val_fraction,
                    test_fraction=cfg.data.test_fraction, seed=cfg.runtime.seed,
                    task=cfg.data.task, group_by=cfg.data.group_by)  # fmt: skip


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
        if RunPaths(out).started():
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
    config_path = RunPaths(out).config
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
    resolved = resolve_config(cfg, splits.classes, pre, get_spec(m.arch).default_input_size)
    if is_prepared(cfg.data.path):  # the prepared pixels' window, recorded as the run's own
        resolved = resolved.replace(window=shard_window(cfg.data.path, cfg.data.window))
    note = defaults_note(cfg, resolved)
    if note:
        log.info(note)
    return resolved, model


def _known_file_preprocessing(weights: Path) -> dict:
    """A local copy of registered weights (found by its sha256) carries the registry's
    categories and preprocessing, as the registered name would."""
    from ..models.weights import get_weights, list_weights

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
    saved = read_saved_config(weights.parent) if weights.is_file() else None
    if saved is None:
        return {}
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
    from ..quality.leakage import find_duplicates, remove_leaks

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
    _warn_shared_groups(splits)
    if mode == "remove" and dups:
        _, dropped = remove_leaks(groups, dups)
        for name, paths in dropped.items():
            gone = set(paths)
            setattr(splits, name, [x for x in getattr(splits, name) if x.path not in gone])
    return dups


def _warn_shared_groups(splits: DataSplits) -> dict[str, list[str]]:
    """Warn about groups (patients ...) in two splits: the hand-made splits can share them."""
    from ..quality.leakage import shared_groups

    shared = shared_groups(
        {n: [x.group for x in getattr(splits, n)] for n in ("train", "val", "test")}
    )
    if shared:
        log.warning(
            "%d group(s) have images in more than one split (%s): scores on val/test are "
            "optimistic; keep each group in one split (or let --group-by carve val)",
            len(shared), ", ".join(f"{g}: {'/'.join(s)}" for g, s in list(shared.items())[:5]),
        )  # fmt: skip
    return shared


def _leakage_embedder(cfg: TrainConfig, model: nn.Module | None) -> Any:
    """The model as an embedder, at the run's evaluation preprocessing (it works on a copy)."""
    if not cfg.model.weights or model is None:
        raise ConfigError(
            "--leakage-signal both compares the embeddings of pretrained weights: give "
            "--weights (an untrained network's features say nothing about likeness)"
        )
    from ..data.preprocessing import EvalPreprocessing
    from ..inference.embed import Embedder

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

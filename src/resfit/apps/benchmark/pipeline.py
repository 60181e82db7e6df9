"""``resfit bench pipeline`` and the sources row: decode + augment images/s of torchvision's
ImageFolder/DataLoader against resfit's decode-once images and per-epoch augmentation, and the
memory each data source (memory, stream, shards) holds.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...core.config import AugmentConfig
from ...data.augmentation import train_transform
from ...data.datasets import TransformedImages, decode_all, iter_batches
from ...data.discovery import discover
from ...data.preprocessing import base_size_for
from ...models.weights import IMAGENET_MEAN, IMAGENET_STD
from .common import BenchReport, BenchRow, PeakMemory, interleaved, machine_summary

# ---------------------------------------------------------------------------------------------
# Data pipeline


def _pil_transform(cfg: AugmentConfig, img_size: int) -> Callable:
    """``cfg``'s augmentation as users write it with torchvision's classic PIL transforms."""
    from torchvision import transforms as T

    c = cfg.resolved(img_size)
    ops: list[Callable] = []
    if c.crop_scale != (1.0, 1.0):
        ops.append(T.RandomResizedCrop(img_size, scale=c.crop_scale))
    else:
        ops += [T.Resize(base_size_for(img_size)), T.CenterCrop(img_size)]
    if c.hflip:
        ops.append(T.RandomHorizontalFlip(c.hflip))
    if c.vflip:
        ops.append(T.RandomVerticalFlip(c.vflip))
    if c.rotation or c.translate or c.zoom != (1.0, 1.0):
        translate = (c.translate, c.translate) if c.translate else None
        zoom = c.zoom if c.zoom != (1.0, 1.0) else None
        ops.append(T.RandomAffine(c.rotation, translate=translate, scale=zoom))
    if c.color_jitter:
        ops.append(T.ColorJitter(c.color_jitter, c.color_jitter, c.color_jitter))
    if c.policy == "trivialaugment":
        ops.append(T.TrivialAugmentWide())
    elif c.policy == "randaugment":
        ops.append(T.RandAugment())
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if c.erasing:
        ops.append(T.RandomErasing(c.erasing))
    return T.Compose(ops)


def _naive_pipeline(paths: list, labels: list, tf: Callable, batch: int) -> Callable[[], None]:
    """One epoch of torchvision ImageFolder-style loading: PIL decodes every file every epoch,
    through a 0-worker DataLoader (the default)."""
    from PIL import Image

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with Image.open(paths[i]) as im:
                return tf(im.convert("RGB")), labels[i]

    def epoch() -> None:
        for _ in torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True):
            pass

    return epoch


def bench_pipeline(
    data: str | Path,
    *,
    img_size: int = 224,
    augment: str = "standard",
    limit: int = 512,
    batch: int = 32,
    epochs: int = 2,
    consumer_images_per_s: float | None = None,
) -> BenchReport:
    """Decode + augment images/s on the training images of ``data`` (at most ``limit``).

    Naive: torchvision ``ImageFolder``-style loading (PIL decode of every file every epoch,
    then the same augmentation written with the classic PIL transforms, ToTensor, Normalize)
    through a ``DataLoader`` with 0 workers, the default. resfit: :func:`~resfit.data.datasets.decode_all` once (its rate is a row of its own), then
    ``epochs`` epochs of its augmentation preset from memory, as ``train()`` runs them.
    ``consumer_images_per_s`` (the training step's rate) adds how many times faster the
    pipeline is than the step that consumes it.
    """
    splits = discover(str(data))
    step = max(1, len(splits.train) // limit)
    samples = splits.train[::step][:limit]
    paths = [s.path for s in samples]
    labels = [s.label for s in samples]
    report = BenchReport(
        f"data pipeline: {len(samples)} training images of {data}, {img_size} px, "
        f"augment {augment!r}, batch {batch}",
        machine_summary(),
        {},
    )
    naive_epoch = _naive_pipeline(
        paths, labels, _pil_transform(AugmentConfig(augment), img_size), batch
    )

    t0 = time.perf_counter()
    decoded = decode_all(samples, base_size_for(img_size), progress=False)
    decode_s = time.perf_counter() - t0
    tf = train_transform(AugmentConfig(augment), img_size, IMAGENET_MEAN, IMAGENET_STD)
    dataset = TransformedImages(decoded, tf)
    index_batches = [
        list(range(i, min(i + batch, len(dataset)))) for i in range(0, len(dataset), batch)
    ]

    def resfit_epoch() -> None:
        for _ in iter_batches(dataset, index_batches):
            pass

    secs = interleaved({"naive": naive_epoch, "resfit": resfit_epoch}, epochs)
    n = len(decoded)
    naive_ips, resfit_ips = n / secs["naive"], n / secs["resfit"]
    report.rows = [
        BenchRow("naive: decode + augment every epoch (baseline)", "", naive_ips, ratio=1.0),
        BenchRow("resfit: decode once", "", n / decode_s, note="paid once per run, in threads"),
        BenchRow(f"resfit: augment {augment!r} per epoch", "", resfit_ips,
                 ratio=resfit_ips / naive_ips),
    ]  # fmt: skip
    if consumer_images_per_s:
        _add_consumption(report, consumer_images_per_s, resfit_ips, naive_ips)
    return report


def _add_consumption(report: BenchReport, consumer: float, resfit_ips: float,
                     naive_ips: float) -> None:  # fmt: skip
    """How many times faster each pipeline feeds images than the training step eats them."""
    report.info["training step consumes"] = f"{consumer:.1f} images/s"
    report.info["resfit pipeline / consumption"] = f"{resfit_ips / consumer:.1f}x"
    report.info["naive pipeline / consumption"] = f"{naive_ips / consumer:.1f}x"


def bench_sources(
    data: str | Path,
    *,
    img_size: int = 224,
    augment: str = "standard",
    limit: int = 512,
    batch: int = 32,
    epochs: int = 2,
    workers: tuple[int, ...] = (1, 2),
    consumer_images_per_s: float | None = None,
    modes: tuple[str, ...] | None = None,
) -> BenchReport:
    """Images/s and peak memory of each data mode as ``train()`` runs it, per worker count:
    ``stream`` (decode + augment every image every epoch, in the DataLoader workers),
    ``shards`` (the same from the pre-resized JPEGs ``resfit prepare`` wrote: its one-off
    writing time is reported apart) and ``memory`` (decode once, here in threads, then augment
    in the workers). The rate is over ``epochs`` epochs of the first ``limit`` training images
    of ``data``; memory's includes its decoding, as a run of ``epochs`` epochs pays it."""
    from ...data.sources import Sharding, get_source

    if modes is None:  # shards where LitData is installed (resfit[shards])
        has_litdata = importlib.util.find_spec("litdata") is not None
        modes = ("stream", "shards", "memory") if has_litdata else ("stream", "memory")
    splits = discover(str(data))
    samples = splits.train[:: max(1, len(splits.train) // limit)][:limit]
    tf = train_transform(AugmentConfig(augment), img_size, IMAGENET_MEAN, IMAGENET_STD)
    report = BenchReport(
        f"data modes: {len(samples)} training images of {data}, {img_size} px, augment "
        f"{augment!r}, batch {batch}, {epochs} epochs",
        machine_summary(),
        {},
    )
    sharding = Sharding.plan(len(samples), batch, 0, 1, seed=0)
    work = Path(tempfile.mkdtemp(prefix="resfit-bench-shards-"))
    try:
        opened_by_mode = {m: [samples[i] for i in sharding.ids] for m in modes}
        if "shards" in modes:
            opened_by_mode["shards"] = _prepared(samples, splits.classes, img_size, work, report)
            opened_by_mode["shards"] = [opened_by_mode["shards"][i] for i in sharding.ids]
        for mode in modes:
            for w in workers:
                with PeakMemory() as mem:
                    secs = _time_source(get_source(mode), opened_by_mode[mode], tf, img_size,
                                        sharding, epochs, w)  # fmt: skip
                rate = sharding.steps * batch * epochs / secs
                note = (
                    f"peak PSS {mem.pss / 1e9:.2f} GB, RSS {mem.rss / 1e9:.2f} (process + workers)"
                )
                if consumer_images_per_s:
                    note += f", {rate / consumer_images_per_s:.1f}x the step"
                report.rows.append(BenchRow(f"{mode}, {w} worker(s)", "", rate, note=note))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if consumer_images_per_s:
        report.info["training step consumes"] = f"{consumer_images_per_s:.1f} images/s"
    return report


def _time_source(source: Any, samples: list, tf: Any, img_size: int, sharding: Any,
                 epochs: int, workers: int) -> float:  # fmt: skip
    """Seconds to open ``samples`` with ``source`` and run ``epochs`` epochs of batches."""
    t0 = time.perf_counter()
    opened = source.open(samples, base_size_for(img_size), progress=False, desc="")
    dataset = TransformedImages(opened, tf)
    for e in range(epochs):
        for _ in source.batches(dataset, sharding.epoch(e), workers, seed=e):
            pass
    return time.perf_counter() - t0


def _prepared(samples: list, classes: list[str], img_size: int, work: Path,
              report: BenchReport) -> list:  # fmt: skip
    """``samples`` written by ``resfit prepare`` (as a manifest of train rows) and read back."""
    import csv

    from ...data.shards import prepare, read_splits

    with open(work / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([str(s.path), classes[s.label], "train"] for s in samples)
        w.writerow([str(samples[0].path), classes[samples[0].label], "val"])  # val needs one
    t0 = time.perf_counter()
    prepare(work / "m.csv", work / "shards", img_size=img_size, progress=False)
    secs = time.perf_counter() - t0
    report.info["resfit prepare"] = f"{secs:.1f} s ({len(samples) / secs:.0f} images/s, once)"
    return read_splits(work / "shards").train

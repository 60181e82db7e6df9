"""Data sources: how the images of a split reach the training loop.

A source opens the samples of a split (paths and labels from :func:`resfit.data.discovery.discover`)
and serves batches of them by index. The loop asks the source for every batch, so where the
pixels live is the source's business.

- ``memory`` (:class:`InMemory`): every image decoded once, resized to the run's base size,
  kept as uint8 tensors: no epoch pays for JPEG decoding again, and broken files are known
  before training starts. About 0.26 MB per photo at 224 px.
- ``stream`` (:class:`Streaming`): nothing decoded up front; the loop's DataLoader workers
  decode and augment each image when its batch comes. A header check at open lists the files
  that are not images; a file that fails later is replaced by the next readable one and listed.
  Each image's augmentation is seeded by (run seed, epoch, step, image), so an epoch is the
  same whatever the number of workers or ranks, and a run resumed mid-epoch is the same run.
- ``shards`` (:class:`Shards`): stream mode on a folder written by ``resfit prepare``
  (:mod:`resfit.data.shards`): pre-resized JPEGs read by index from LitData chunks.
- ``auto`` (:func:`choose_mode`): shards for a prepared folder, else memory when the decoded images fit in the memory available
  to this rank with room to spare, else stream; it decides from a few file headers, before
  anything is decoded.

Under torchrun each rank opens only its share of the training split (:class:`Sharding`): the
global batch is made of ``batch_size`` slots, each slot drawing from its own fixed shard of
the files, and each rank owns the slots of its local batch. The global batches are the same for
any number of ranks, so a 2-process run equals a 1-process run, while each rank reads (stream)
or holds (memory) only its own files.

A source carries the run's intensity ``window`` (DICOM and 16-bit images, ``--window``) and
decodes every image through it: a value held by the source, not a process-wide setting.

Add a source: subclass :class:`DataSource`, add it to ``SOURCES`` and its name to
``config.DATA_MODES`` (the CLI's ``--data-mode`` choices).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..core.config import DATA_MODES
from ..core.errors import ConfigError
from ..core.registry import Registry
from ..core.windows import Window
from .datasets import DecodedImages, decode_all, iter_batches
from .decode import MAX_PIXELS, DecodeError, load_image, resize_shorter, to_tensor
from .paths import display_path
from .samples import Sample

log = logging.getLogger("resfit")

# A decoded image as kept in memory: 3 bytes a pixel (4: a grey DICOM) plus the tensor's own
# bookkeeping.
_TENSOR_OVERHEAD = 400
# auto keeps the images in memory only when they take at most this share of what is available
# (the model, its activations, the optimizer and the workers need the rest).
AUTO_MEMORY_SHARE = 0.5
# --data-mode memory refuses data that would take more than this share.
MEMORY_REFUSE_SHARE = 0.85


class DataSource:
    """Opens a split's samples and serves batches of a dataset built on them."""

    mode: ClassVar[str]

    def __init__(self, window: Window = None) -> None:
        self.window = window  # the run's --window, for DICOM and 16-bit images

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        """The readable images of ``samples`` (with their labels, paths and the skipped files)."""
        raise NotImplementedError

    def batches(
        self,
        dataset: torch.utils.data.Dataset,
        index_batches: Sequence[Sequence[int]],
        workers: int = 0,
        *,
        seed: int = 0,
        first_step: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Stacked ``(x, y)`` for each list of indices, in order: per-image transforms here on
        one thread, or in ``workers`` processes. ``seed`` is the epoch's and ``first_step``
        the number of the first batch (both for sources that seed each image)."""
        return iter_batches(dataset, index_batches, workers)


class InMemory(DataSource):
    """Every image decoded once into memory (threads decode; PIL releases the GIL)."""

    mode: ClassVar[str] = "memory"

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        return decode_all(samples, base_size, progress=progress, desc=desc, window=self.window)


# ---------------------------------------------------------------------------------------------
# Streaming


def header_problem(path: Path) -> str | None:
    """Why ``path`` is not an image, from its header alone (no pixel is decoded), or None."""
    from PIL import Image

    from .dicom import dicom_pixels, is_dicom

    try:
        if os.stat(path).st_size == 0:
            return "empty file"
        if is_dicom(path):  # PIL cannot open it: its header through pydicom
            with open(path, "rb") as f:
                pixels = dicom_pixels(f.read())
            return None if 0 < pixels <= MAX_PIXELS else f"{pixels:,} pixels (DICOM header)"
        with Image.open(path) as img:
            if img.width <= 0 or img.height <= 0 or img.width * img.height > MAX_PIXELS:
                return f"{img.width}x{img.height} pixels (the limit is {MAX_PIXELS:,})"
    except Exception as e:  # PIL raises many types for broken files
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


class LazyImages(Sequence[Tensor]):
    """Images that are decoded (and resized to ``base_size``) when indexed, each time."""

    def __init__(self, paths: Sequence[Path], base_size: int, window: Window = None) -> None:
        self.paths, self.base_size, self.window = list(paths), base_size, window

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return LazyImages(self.paths[i], self.base_size, self.window)
        img = load_image(self.paths[i], max_side=self.base_size * 2, window=self.window)
        return to_tensor(resize_shorter(img, self.base_size))


class StreamedImages(DecodedImages):
    """A split that is decoded on demand. A file that fails to decode is replaced by the next
    readable one (the batch keeps its size, the label follows the image) and appended to
    ``skip_log`` (a CSV; every worker appends its own lines) with the reason."""

    def __init__(self, samples: Sequence[Sample], base_size: int,
                 skipped: list[tuple[str, str]], skip_log: Path | None = None,
                 window: Window = None) -> None:  # fmt: skip
        paths = [s.path for s in samples]
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        images = LazyImages(paths, base_size, window)
        super().__init__(images, labels, paths, skipped, base_size)  # type: ignore[arg-type]
        self.skip_log, self.failed = skip_log, set()

    def item(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self.paths)
        for k in range(n):
            j = (i + k) % n
            if j in self.failed:
                continue
            try:
                return self.images[j], self.labels[j]
            except DecodeError as e:
                self._fail(j, str(e))
        raise DecodeError("no image of the split could be decoded")

    def _fail(self, j: int, reason: str) -> None:
        self.failed.add(j)
        log.warning("skipping %s: %s", display_path(self.paths[j]), reason)
        if self.skip_log is not None:
            import csv
            import io

            line = io.StringIO()
            csv.writer(line).writerow([str(self.paths[j]), reason])
            # One short append per line: atomic across the worker processes (O_APPEND).
            with open(self.skip_log, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(line.getvalue())


class _Seeded(torch.utils.data.Dataset):
    """Items keyed ``(seed, index)``: the augmentation of each image draws from its own seed,
    whichever process or worker makes it, and leaves the caller's random state alone."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        seed, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[i]


def item_seed(epoch_seed: int, step: int, sample_id: int) -> int:
    """The seed of one image's augmentation: the same on every rank and in every worker."""
    return (epoch_seed * 1_000_003 + step * 10_007 + sample_id) % (1 << 62)


class Streaming(DataSource):
    """Decode and augment on the fly (in the loop's ``--workers`` processes), nothing kept."""

    mode: ClassVar[str] = "stream"

    def __init__(self, skip_log: Path | None = None, window: Window = None) -> None:
        super().__init__(window)
        self.skip_log = skip_log

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        from ..core.progress import progress_bar

        with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as pool:
            checks = pool.map(header_problem, [s.path for s in samples], chunksize=256)
            problems = list(progress_bar(checks, total=len(samples), enabled=progress,
                                         desc=desc.replace("decoding", "checking")))  # fmt: skip
        skipped = [(str(s.path), p) for s, p in zip(samples, problems, strict=True) if p]
        for path, reason in skipped:
            log.warning("skipping %s: %s", display_path(path), reason)
        readable = [s for s, p in zip(samples, problems, strict=True) if not p]
        return StreamedImages(readable, base_size, skipped, self.skip_log, self.window)

    def batches(
        self,
        dataset: torch.utils.data.Dataset,
        index_batches: Sequence[Sequence[int]],
        workers: int = 0,
        *,
        seed: int = 0,
        first_step: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        ids = getattr(getattr(dataset, "decoded", None), "ids", None)
        keyed = [
            [(item_seed(seed, first_step + s, int(ids[i]) if ids is not None else int(i)), int(i))
             for i in batch]
            for s, batch in enumerate(index_batches)
        ]  # fmt: skip
        return iter_batches(_Seeded(dataset), keyed, workers)


class Shards(Streaming):
    """Stream from a folder written by ``resfit prepare`` (:mod:`resfit.data.shards`): the same
    per-image seeds and sharding as :class:`Streaming`, pixels read from the LitData chunks
    by index. The files that could not be read were left out by ``prepare``."""

    mode: ClassVar[str] = "shards"

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        from .shards import ShardImages

        splits = {getattr(s, "split", None) for s in samples}
        if not samples:
            return StreamedImages(samples, base_size, [], self.skip_log)
        if None in splits or len(splits) != 1:
            raise ConfigError("--data-mode shards reads a folder written by resfit prepare")
        root = samples[0].root  # type: ignore[attr-defined]
        opened = StreamedImages(samples, base_size, [], self.skip_log)
        opened.images = ShardImages(root, splits.pop(), [s.index for s in samples], base_size)  # type: ignore[attr-defined]
        return opened


SOURCES: Registry[str, type[DataSource]] = Registry("data source")
for _source in (InMemory, Streaming, Shards):
    SOURCES.register(_source.mode, _source)
assert set(SOURCES) | {"auto"} == set(DATA_MODES), "config.DATA_MODES and SOURCES must agree"


def get_source(mode: str, **kwargs: object) -> DataSource:
    if mode not in SOURCES:
        raise ConfigError(f"--data-mode must be one of {', '.join(SOURCES)}, not {mode!r}")
    cls = SOURCES.get(mode)
    if not issubclass(cls, Streaming):
        kwargs.pop("skip_log", None)
    return cls(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Choosing the mode


def available_memory() -> int:
    """Bytes this process can still take: the kernel's MemAvailable, or less where a cgroup
    (a container, a batch job) sets a lower limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            avail = 4 << 30  # nothing to read: assume a small machine
    limit = _cgroup_room()
    return min(avail, limit) if limit is not None else avail


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its usage (v2, then v1), or None without a limit."""
    pairs = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
              "/sys/fs/cgroup/memory/memory.usage_in_bytes"))  # fmt: skip
    for limit_file, usage_file in pairs:
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            return max(0, int(raw) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def decoded_bytes(samples: Sequence[Sample], base_size: int, probe: int = 64,
                  seed: int = 0) -> int:  # fmt: skip
    """The memory ``samples`` take decoded at ``base_size`` (shorter side), from the headers of
    ``probe`` of them: count x base_size^2 x the mean aspect ratio x 3 bytes a pixel (RGB), 4
    for a grey DICOM (kept as one float32 plane)."""
    from PIL import Image

    if not samples:
        return 0
    picks = random.Random(seed).sample(range(len(samples)), min(probe, len(samples)))
    from .dicom import dicom_tags, is_dicom

    ratios, depths = [], []
    for i in picks:
        try:
            path = samples[i].path
            if is_dicom(path):  # PIL cannot read its header; a grey one is kept as float32
                tags = dicom_tags(path, ("Rows", "Columns", "SamplesPerPixel"))
                h, w = int(tags["Rows"]), int(tags["Columns"])
                depths.append(3 if tags["SamplesPerPixel"] == "3" else 4)
            else:
                with Image.open(path) as img:
                    w, h = img.size
                depths.append(3)
            ratios.append(max(w, h) / max(1, min(w, h)))
        except Exception:  # an unreadable file: decoding will skip it
            continue
    ratio = sum(ratios) / len(ratios) if ratios else 4 / 3
    depth = sum(depths) / len(depths) if depths else 3  # bytes a pixel
    per_image = depth * base_size * round(base_size * ratio) + _TENSOR_OVERHEAD
    return int(len(samples) * per_image)


@dataclass(frozen=True)
class ModeChoice:
    mode: str
    reason: str
    estimate: int  # decoded bytes for this rank in memory mode
    available: int  # bytes available to this rank


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_mode(
    requested: str,
    train: Sequence[Sample],
    val: Sequence[Sample],
    sizes: tuple[int, int],
    world: int = 1,
    local_world: int = 1,
    shards: bool = False,
) -> ModeChoice:
    """The data mode for a run: ``requested`` unless it is ``auto``; ``memory`` on data that
    would not fit is a :class:`ConfigError` with the estimate and what to do.

    ``sizes`` are the train and val decode sizes; ``world`` ranks share the training split
    (each decodes its share), ``local_world`` of them share this machine's memory. ``shards``:
    the data is a folder written by ``resfit prepare``, which streams (``auto``, ``stream``).
    """
    if shards:
        if requested == "memory":
            raise ConfigError(
                "--data-mode memory: prepared shards stream (--data-mode auto, stream or "
                "shards); for memory mode train on the original images"
            )
        return ModeChoice("shards", f"{requested}: prepared shards stream from their chunks", 0, 0)
    if requested == "shards":
        raise ConfigError(
            "--data-mode shards reads a folder written by resfit prepare DATA --out SHARDS; "
            "give that folder as DATA, or use --data-mode auto, memory or stream"
        )
    estimate = decoded_bytes(train, sizes[0]) // max(1, world) + decoded_bytes(val, sizes[1])
    available = available_memory() // max(1, local_world)
    need = f"decoded images ~{_gb(estimate)} per rank, {_gb(available)} available per rank"
    if requested == "stream":
        return ModeChoice("stream", f"--data-mode stream ({need})", estimate, available)
    if requested == "memory":
        if estimate > MEMORY_REFUSE_SHARE * available:
            raise ConfigError(
                f"--data-mode memory: the {len(train) + len(val):,} train and val images would "
                f"take ~{_gb(estimate)} decoded per rank, and {_gb(available)} is available "
                f"per rank. Use --data-mode stream (or auto) to decode on the fly, a smaller "
                f"--img-size, or more ranks/memory."
            )
        return ModeChoice("memory", f"--data-mode memory ({need})", estimate, available)
    if requested != "auto":
        raise ConfigError(f"--data-mode must be one of {', '.join(DATA_MODES)}, not {requested!r}")
    if estimate <= AUTO_MEMORY_SHARE * available:
        why = f"auto: {need}, fits in {AUTO_MEMORY_SHARE:.0%} of it"
        return ModeChoice("memory", why, estimate, available)
    why = f"auto: {need}, more than {AUTO_MEMORY_SHARE:.0%} of it, so decoding on the fly"
    return ModeChoice("stream", why, estimate, available)


# ---------------------------------------------------------------------------------------------
# Sharding


@dataclass
class Sharding:
    """Which training images this rank opens, and the batches of every epoch.

    The global batch has ``global_bs`` slots. A seeded permutation deals the split's images
    to the slots (image k of the permutation goes to slot k mod global_bs), so each slot owns a
    fixed shard; every epoch each slot shuffles its shard and global batch i takes the i-th
    image of every slot. Rank r owns the slots of its local batch and opens only their images,
    which makes the global batches, and so the run, the same for any number of ranks. A split
    smaller than the global batch repeats its images to fill one batch (every rank opens all).
    """

    order: list[int]  # the seeded permutation of the split
    slots: list[int]  # the global slot numbers this rank owns
    global_bs: int
    steps: int  # batches per epoch (the caller may lower it: limits, unreadable files)
    seed: int
    shards: list[list[int]] = field(default_factory=list)  # per owned slot: split positions
    ids: list[int] = field(default_factory=list)  # the split positions this rank opens

    @classmethod
    def plan(cls, n: int, global_bs: int, rank: int, world: int, seed: int) -> Sharding:
        """This rank's share of a split of ``n`` images."""
        local_bs = global_bs // world
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + 11))
        slots = list(range(rank * local_bs, (rank + 1) * local_bs))
        return cls(perm.tolist(), slots, global_bs, max(1, n // global_bs), seed)._deal()

    def _deal(self) -> Sharding:
        n, g = len(self.order), self.global_bs
        if n >= g:
            self.shards = [self.order[slot::g] for slot in self.slots]
            self.ids = [i for shard in self.shards for i in shard]
        else:
            self.shards = [[self.order[slot % n]] if n else [] for slot in self.slots]
            self.ids = list(self.order)
        return self

    def drop(self, unreadable: set[int]) -> Sharding:
        """Without the split positions ``unreadable`` (files that could not be opened); the
        caller agrees ``steps`` across ranks (see :meth:`local_steps`)."""
        if len(self.order) < self.global_bs:  # deal the readable ones again
            order = [i for i in self.order if i not in unreadable]
            return Sharding(order, self.slots, self.global_bs, self.steps, self.seed)._deal()
        shards = [[i for i in shard if i not in unreadable] for shard in self.shards]
        ids = [i for shard in shards for i in shard]
        return Sharding(self.order, self.slots, self.global_bs, self.steps, self.seed, shards, ids)

    def local_steps(self) -> int:
        """The most batches this rank's slots can fill (every slot gives one image a batch)."""
        return min((len(shard) for shard in self.shards), default=0)

    def epoch(self, epoch: int, weights: Tensor | None = None) -> list[list[int]]:
        """The epoch's local batches as positions in :attr:`ids` (the images this rank
        opened). With ``weights`` (one per opened image) each slot draws with replacement."""
        where = {i: k for k, i in enumerate(self.ids)}
        columns = []
        for slot, shard in zip(self.slots, self.shards, strict=True):
            # Seeded by the global slot: the same draws whichever rank owns it.
            g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 65_537 + slot)
            local = torch.tensor([where[i] for i in shard], dtype=torch.long)
            if weights is not None:
                draw = torch.multinomial(weights[local], self.steps, replacement=True,
                                         generator=g)  # fmt: skip
            else:
                draw = torch.randperm(len(shard), generator=g)[: self.steps]
            columns.append(local[draw].tolist())
        return [[col[i] for col in columns] for i in range(self.steps)]

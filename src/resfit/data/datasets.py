"""Decoded images held ready for training: decode every sample once, in threads
(:func:`decode_all`), keep them as uint8 tensors (windowed DICOM/16-bit images: float32 in
[0, 1], see :mod:`resfit.data.decode`) (:class:`DecodedImages`), and serve augmented batches from
them (:class:`TransformedImages`, :func:`iter_batches`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.labels import coding_of
from ..core.threads import worker_init
from ..core.windows import Window
from .decode import DecodeError, load_image, resize_shorter, to_tensor
from .paths import display_path
from .samples import Sample

log = logging.getLogger("resfit")

__all__ = ["DecodedImages", "TransformedImages", "decode_all", "iter_batches", "subset"]


@dataclass
class DecodedImages:
    """Images decoded once, shorter side resized to ``base_size``, as (3, H, W) tensors: uint8,
    or float32 in [0, 1] for windowed images."""

    images: list[Tensor]
    labels: Tensor
    paths: list[Path]
    skipped: list[tuple[str, str]]
    base_size: int
    ids: list[int] | None = None  # positions in the split (a rank's share is a subset)

    def __len__(self) -> int:
        return len(self.images)

    def item(self, i: int) -> tuple[Tensor, Tensor]:
        """Image ``i`` and its label (a streamed split decodes it here)."""
        return self.images[i], self.labels[i]


class _Subset(DecodedImages):
    """Some images of ``parent``, read through its ``item`` (a streamed split decodes, and
    skips a broken file, as it does for the whole split)."""

    def __init__(self, parent: DecodedImages, index: Sequence[int]) -> None:
        index = [int(i) for i in index]
        super().__init__(_Positions(parent, index), parent.labels[index],
                         [parent.paths[i] for i in index], [], parent.base_size)  # fmt: skip
        self.parent, self.index = parent, index

    def item(self, i: int) -> tuple[Tensor, Tensor]:
        return self.parent.item(self.index[i])


class _Positions:
    """The images of a subset, by position: its length, and each image on demand."""

    def __init__(self, parent: DecodedImages, index: list[int]) -> None:
        self.parent, self.index = parent, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Tensor:
        return self.parent.item(self.index[i])[0]


def subset(decoded: DecodedImages, index: Sequence[int]) -> DecodedImages:
    """The images of ``decoded`` at positions ``index``, in that order, without copying or
    decoding any of them."""
    return _Subset(decoded, index)


def decode_all(
    samples: Sequence[Sample],
    base_size: int,
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decoding",
    transform: Callable[[Tensor], Tensor] | None = None,
    window: Window = None,
) -> DecodedImages:
    """Decode every sample once (in threads: PIL releases the GIL while decoding).

    Done up front so that broken files are known and listed before training starts, and so
    that no epoch pays for JPEG decoding again: on a 2-core machine decoding otherwise costs as
    much as the forward pass of a small network. ``transform`` (prediction's crop and
    normalise) runs in the same threads, beside the model rather than before it. ``window``:
    the intensity window of DICOM and 16-bit images (the run's ``--window``).
    """
    from ..core.progress import progress_bar

    def work(s: Sample) -> Tensor | str:
        try:
            img = load_image(s.path, max_side=base_size * 2, window=window)
            tensor = to_tensor(resize_shorter(img, base_size))
        except DecodeError as e:
            return str(e)
        return transform(tensor) if transform is not None else tensor

    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    images, labels, paths, skipped = [], [], [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(work, samples, chunksize=16)
        for s, r in progress_bar(
            zip(samples, results, strict=True), total=len(samples), desc=desc, enabled=progress
        ):
            if isinstance(r, str):
                skipped.append((str(s.path), r))
                log.warning("skipping %s: %s", display_path(s.path), r)
            else:
                images.append(r)
                labels.append(s.label)
                paths.append(s.path)
    # The samples' own coding makes the targets (multi-hot: float targets for the BCE loss).
    first = samples[0].label if samples else 0
    target = coding_of(first).targets(labels, len(first) if isinstance(first, tuple) else 0)
    return DecodedImages(images, target, paths, skipped, base_size)


class TransformedImages(torch.utils.data.Dataset):
    """Decoded images with a per-sample transform (uint8 tensor -> float tensor)."""

    def __init__(self, decoded: DecodedImages, transform: Callable[[Tensor], Tensor]) -> None:
        self.decoded = decoded
        self.transform = transform

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, label = self.decoded.item(i)
        return self.transform(image), label


def _key(i: object) -> object:
    """An index as the dataset takes it: an int (tensor elements too), or a tuple key."""
    return i if isinstance(i, tuple) else int(i)  # type: ignore[call-overload]


def iter_batches(
    dataset: torch.utils.data.Dataset, index_batches: Sequence[Sequence[int]], workers: int = 0
):
    """Yield stacked ``(x, y)`` batches for the given index lists. With ``workers`` > 0 the
    per-image transforms run in that many processes (overlapping the model); with 0 they run
    here on one thread: a 32 px random affine takes 0.33 ms on one thread and 2.5 ms on
    two here, since such small ops cost more to split than to run."""
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[[_key(i) for i in b] for b in index_batches],
            num_workers=workers,
            worker_init_fn=worker_init,  # one thread per worker: the cores are the model's
        )
        batches = iter(loader)
        try:
            yield from batches
        finally:  # a consumer that stops early (batch limits) still ends the workers now
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        return
    for idx in index_batches:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            items = [dataset[_key(i)] for i in idx]
        finally:
            torch.set_num_threads(before)
        yield (
            torch.stack([it[0] for it in items]),
            torch.stack([torch.as_tensor(it[1]) for it in items]),
        )

"""Data sources: how the images of a split reach the training loop.

A source opens the samples of a split (paths and labels from :func:`resfit.data.discover`)
and serves batches of them by index. The loop asks the source for every batch, so where the
pixels live is the source's business.

Today: ``memory`` (:class:`InMemory`), every image decoded once, resized to the run's base
size, kept as uint8 tensors: no epoch pays for JPEG decoding again, and broken files are known
before training starts. A streaming source (decoding on the fly in worker processes) plugs in
next to it.

Add a source: subclass :class:`DataSource`, add it to ``SOURCES`` and its name to
``config.DATA_MODES`` (the CLI's ``--data-mode`` choices).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .config import DATA_MODES
from .data import DecodedImages, Sample, decode_all, iter_batches
from .errors import ConfigError


class DataSource:
    """Opens a split's samples and serves batches of a dataset built on them."""

    mode: ClassVar[str]

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        """The readable images of ``samples`` (with their labels, paths and the skipped files)."""
        raise NotImplementedError

    def batches(
        self,
        dataset: torch.utils.data.Dataset,
        index_batches: Sequence[Sequence[int]],
        workers: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Stacked ``(x, y)`` for each list of indices, in order: per-image transforms here on
        one thread, or in ``workers`` processes. A source that streams overrides this."""
        return iter_batches(dataset, index_batches, workers)


class InMemory(DataSource):
    """Every image decoded once into memory (threads decode; PIL releases the GIL)."""

    mode: ClassVar[str] = "memory"

    def open(self, samples: Sequence[Sample], base_size: int, *, progress: bool,
             desc: str) -> DecodedImages:  # fmt: skip
        return decode_all(samples, base_size, progress=progress, desc=desc)


SOURCES: dict[str, type[DataSource]] = {InMemory.mode: InMemory}
assert set(SOURCES) == set(DATA_MODES), "config.DATA_MODES and sources.SOURCES must agree"


def get_source(mode: str) -> DataSource:
    try:
        return SOURCES[mode]()
    except KeyError:
        raise ConfigError(
            f"--data-mode must be one of {', '.join(SOURCES)}, not {mode!r}"
        ) from None

"""What discovery produces: a :class:`Sample` (path, label, split) and :class:`DataSplits` (the
samples of each split, the classes, what was skipped and why), and the split folder names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SHARD_INDEX", "SPLIT_FOLDER_NAMES", "DataSplits", "Sample", "split_of"]

# The folder names (compared in lower case) that hold each split, first the canonical one.
SPLIT_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
SPLITS = tuple(SPLIT_FOLDER_NAMES)
# The index that ``resfit prepare`` writes into a shard folder (see resfit.data.shards).
SHARD_INDEX = "resfit-shards.json"
_SPLIT_OF_NAME = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}


@dataclass
class Sample:
    """One image and its label: a class index, or for multi-label data a multi-hot tuple (one
    0/1 per class, in the order of the classes)."""

    path: Path
    label: int | tuple[int, ...]
    group: str = ""  # the patient/study/camera it belongs to (--group-by), "" if none known


@dataclass
class DataSplits:
    """What :func:`discover` found: the splits, the class names and the files it ignored.

    ``origins`` says where each split came from (``{"val": "15% of train, seed 0"}``), for
    logs and the report.
    """

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""
    origins: dict[str, str] = field(default_factory=dict)
    task: str = "single"  # or "multilabel": each sample's label is a multi-hot tuple
    # path -> (sha256, perceptual hash or None), where known without reading the files
    # (prepared shards carry them): the leakage check uses them instead of hashing again.
    fingerprints: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class and split (multi-label: the images that carry the class)."""
        from ..core.labels import CODINGS

        coding, out = CODINGS.get(self.task), {}
        for split in SPLITS:
            c = Counter(i for s in getattr(self, split) for i in coding.classes_of(s.label))
            out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out


def split_of(name: str) -> str | None:
    """The split a folder or manifest value names (``"Validation"`` -> ``"val"``), or None."""
    return _SPLIT_OF_NAME.get(name.strip().lower())

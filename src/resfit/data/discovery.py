"""Discovery: find labelled images and split them.

Layouts understood by :func:`discover`:
- ``DATA/train/<class>/*`` with optional ``DATA/val/<class>/*`` and ``DATA/test/<class>/*``
  (a missing val split is carved out of train, stratified by the seed). The split folders may
  use the usual other names, in any case: ``training``; ``valid``, ``validation``, ``dev``;
  ``testing`` (see ``SPLIT_FOLDER_NAMES``). Which folder went to which split is logged, and
  other top-level folders are named in a warning, never silently dropped;
- ``DATA/<class>/*``: one folder of class folders, split into train/val/test by the seed;
- a CSV manifest ``path,label[,split]`` (paths relative to the CSV's folder), such as the
  ``splits.csv`` that :func:`write_splits` records and :func:`read_splits` reads back;
- a multi-label CSV manifest ``path,labels[,split]``: an image's labels joined by ``;`` (an
  empty field: none of the classes). Its samples carry a multi-hot tuple instead of a class
  index, and :attr:`DataSplits.task` is ``"multilabel"``.

Decoding is :mod:`resfit.data.decode`, the decoded images :mod:`resfit.data.datasets`.

Knows nothing of models or training.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from ..core.atomic import atomic_csv
from ..core.errors import DataError
from ..core.labels import CODINGS, LabelCoding, coding_for
from .groups import CARVED, regroup
from .manifests import (
    as_task,
    discover_multilabel_csv,
    label_column,
    multilabel_eval_samples,
    read_manifest,
    read_multilabel_splits,
)
from .paths import IMAGE_SUFFIXES, display_path, display_text, list_images
from .samples import SHARD_INDEX, SPLIT_FOLDER_NAMES, SPLITS, DataSplits, Sample, split_of

log = logging.getLogger("resfit")

__all__ = [
    "discover",
    "eval_samples",
    "find_split_folders",
    "read_splits",
    "scan_class_folders",
    "write_splits",
]


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Map class name -> image files for a folder of class folders; empty classes dropped."""
    if not root.is_dir():
        raise DataError(f"{display_path(root)} is not a folder")
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(d)
        if files:
            found[d.name] = files
        else:
            log.warning("ignoring empty class folder %s (no images in it)", display_path(d))
    return found


def find_split_folders(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """The split folders directly under ``root`` (``{"val": root / "Validation"}``) and the
    other visible folders. Two folders for one split (``val/`` and ``validation/``) are a
    :class:`DataError` naming both: merging them silently could mix a test set into training.
    """
    by_split: dict[str, list[Path]] = {}
    others: list[Path] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        split = split_of(d.name)
        if split is None:
            others.append(d)
        else:
            by_split.setdefault(split, []).append(d)
    for split, dirs in by_split.items():
        if len(dirs) > 1:
            names = " and ".join(f"{display_path(d.name)}/" for d in dirs)
            raise DataError(
                f"{display_path(root)} has {len(dirs)} folders for the {split} split: {names}. "
                f"Keep one of them (move the images of the other into it, or rename it)."
            )
    return {s: dirs[0] for s, dirs in by_split.items()}, others


def _stratified_split(
    items: dict[str, list[Path]], fractions: Sequence[float], seed: int
) -> list[dict[str, list[Path]]]:
    """Split each class's files by ``fractions`` (each split gets >= 1 file per class when the
    class has enough), deterministically for a seed."""
    rng = random.Random(seed)
    parts: list[dict[str, list[Path]]] = [{} for _ in range(len(fractions) + 1)]
    for cls, files in items.items():
        files = list(files)
        rng.shuffle(files)
        n = len(files)
        cuts, start = [], 0
        for frac in fractions:
            k = max(1, round(n * frac)) if n >= len(fractions) + 1 else 0
            cuts.append((start, start + k))
            start += k
        for i, (a, b) in enumerate(cuts):
            parts[i + 1][cls] = files[a:b]
        parts[0][cls] = files[start:]
    return parts


def _to_samples(by_class: dict[str, list[Path]], classes: list[str], split: str) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise DataError(
            f"the {split} split has classes that training does not: "
            f"{', '.join(map(display_text, unknown))}. "
            f"Add training images for them or remove them from {split}."
        )
    return [Sample(p, index[c]) for c, files in by_class.items() for p in files]


def discover(
    data: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    seed: int = 0,
    task: str = "auto",
    group_by: str | None = None,
) -> DataSplits:
    """Find the labelled images under ``data`` (see the module doc for the layouts).

    ``task``: ``"auto"`` takes it from the data (a ``labels`` column is multi-label),
    ``"multilabel"`` reads one-label data as multi-label, ``"single"`` refuses an image with
    other than one label. ``group_by``: a manifest column or DICOM tag whose groups never
    straddle the carved splits (default: a manifest's ``group`` column, else DICOM PatientID
    where the files carry it; see :mod:`resfit.data.groups`). Logs (INFO, logger ``"resfit"``) where each split comes from, and
    warns about folders and images that it does not use.
    """
    if task != "auto" and task not in CODINGS:  # a registered task is known here by its coding
        raise DataError(f"task must be one of {', '.join(['auto', *CODINGS])}, not {task!r}")
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data path {display_path(root)} does not exist")
    _refuse_shards(root, "this command")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(
                f"{display_path(root)} is a file but not a CSV manifest (path,label[,split], "
                f"or path,labels[,split] for several labels per image)"
            )
        read = _CSV_READERS[label_column(root, task)]
        splits = read(root, val_fraction, test_fraction, seed)
    else:
        folders, others = find_split_folders(root)
        if "train" in folders:
            splits = _discover_split_folders(
                root, folders, others, val_fraction, test_fraction, seed
            )
        elif folders:
            names = ", ".join(f"{display_path(d.name)}/" for d in folders.values())
            raise DataError(
                f"{display_path(root)} has {names} but no train/ (or training/) folder: put the "
                f"training images in {display_path(root)}/train/<class>/. If {names} is a "
                f"class, give it another name."
            )
        else:
            splits = _discover_flat(root, val_fraction, test_fraction, seed)
    splits = as_task(splits, task)
    fractions = {"val": val_fraction, "test": test_fraction}
    splits = regroup(splits, root, group_by, fractions, seed, CODINGS.get(splits.task).classes_of)
    for split in SPLITS:
        log.info("data: %s <- %s", split, splits.origins.get(split, "none"))
    return splits


def _refuse_shards(root: Path, what: str) -> None:
    if (root / SHARD_INDEX).is_file():
        raise DataError(
            f"{display_path(root)} holds prepared shards (resfit prepare): resfit train reads "
            f"them; {what} needs the original images (the data given to resfit prepare)"
        )


def _carve_note(fraction: float, seed: int, what: str) -> str:
    return f"{fraction:.0%} of {what}, {CARVED} {seed}"


def _discover_split_folders(
    root: Path,
    folders: dict[str, Path],
    others: list[Path],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> DataSplits:
    names = ", ".join(f"{n}/" for names in SPLIT_FOLDER_NAMES.values() for n in names)
    for d in others:
        log.warning(
            "ignoring %s/: not a split folder (the split folders are %s)", display_path(d), names
        )
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        log.warning(
            "ignoring %d image(s) directly in %s: images go in %s/<split>/<class>/",
            len(loose),
            display_path(root),
            display_path(root),
        )
    train_dir = folders["train"]
    train = scan_class_folders(train_dir)
    _check_classes(train, train_dir)
    classes = sorted(train)
    origins = {split: display_path(d) for split, d in folders.items()}
    val = scan_class_folders(folders["val"]) if "val" in folders else None
    test = scan_class_folders(folders["test"]) if "test" in folders else {}
    # Held out of train only for what has no folder: a test share first, so that val keeps
    # its usual size whether or not a test share is asked for.
    fractions = ([] if val is not None else [val_fraction]) + (
        [test_fraction] if test_fraction > 0 and "test" not in folders else []
    )
    if fractions:
        parts = _stratified_split(train, fractions, seed)
        train, carved = parts[0], parts[1:]
        if val is None:
            val = carved.pop(0)
            origins["val"] = _carve_note(val_fraction, seed, display_path(train_dir))
        if carved:
            test = carved[0]
            origins["test"] = _carve_note(test_fraction, seed, display_path(train_dir))
    return DataSplits(
        classes,
        _to_samples(train, classes, "train"),
        _to_samples(val, classes, "val"),
        _to_samples(test, classes, "test"),
        source=str(root),
        origins=origins,
    )


def _discover_flat(root: Path, val_fraction: float, test_fraction: float, seed: int) -> DataSplits:
    by_class = scan_class_folders(root)
    _check_classes(by_class, root)
    classes = sorted(by_class)
    fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 else [])
    parts = _stratified_split(by_class, fractions, seed)
    where = f"the class folders of {display_path(root)}"
    origins = {
        "train": f"the rest of {where}",
        "val": _carve_note(val_fraction, seed, where),
    }
    if test_fraction > 0:
        origins["test"] = _carve_note(test_fraction, seed, where)
    return DataSplits(
        classes,
        _to_samples(parts[0], classes, "train"),
        _to_samples(parts[1], classes, "val"),
        _to_samples(parts[2], classes, "test") if test_fraction > 0 else [],
        source=str(root),
        origins=origins,
    )


def _check_classes(by_class: dict[str, list[Path]], root: Path) -> None:
    where = display_path(root)
    if not by_class:
        raise DataError(
            f"no class folders with images under {where}: expected {where}/<class>/<image> "
            f"(or {where}/train/<class>/<image>), images ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    if len(by_class) == 1:
        raise DataError(
            f"{where} has a single class ({display_text(next(iter(by_class)))}): a classifier "
            f"needs at least two class folders"
        )


def _discover_csv(path: Path, val_fraction: float, test_fraction: float, seed: int) -> DataSplits:
    rows, skipped = read_manifest(path)
    by_split: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
    for p, label, split in rows:
        # Rows without a split are training rows (and the source of a carved-out val).
        by_split[split or "train"].setdefault(label, []).append(p)
    _check_classes(by_split["train"], path)
    classes = sorted(by_split["train"])
    train, val, test = by_split["train"], by_split["val"], by_split["test"]
    where = display_path(path)
    origins = {"train": f"{where} (train rows)"}
    if val:
        origins["val"] = f"{where} (val rows)"
    if test:
        origins["test"] = f"{where} (test rows)"
    if not val:
        fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 and not test else [])
        parts = _stratified_split(train, fractions, seed)
        train, val = parts[0], parts[1]
        origins["val"] = _carve_note(val_fraction, seed, f"the train rows of {where}")
        if len(parts) > 2:
            test = parts[2]
            origins["test"] = _carve_note(test_fraction, seed, f"the train rows of {where}")
    return DataSplits(
        classes,
        _to_samples(train, classes, "train"),
        _to_samples(val, classes, "val"),
        _to_samples(test, classes, "test"),
        skipped=skipped,
        source=str(path),
        origins=origins,
    )


# A manifest's reader, by its label column: one class per row, or label sets.
_CSV_READERS = {"label": _discover_csv, "labels": discover_multilabel_csv}


def write_splits(path: str | os.PathLike[str], splits: DataSplits) -> None:
    """Record every file's split as ``path,label,split`` (absolute path, class name), in the
    order of the splits, so a user can check what went where and :func:`read_splits` (or
    ``resfit train splits.csv``) can reproduce it. Odd file names keep their bytes."""
    path = Path(path)
    coding = CODINGS.get(splits.task)
    every = [(s, split) for split in SPLITS for s in getattr(splits, split)]
    grouped = any(s.group for s, _ in every)  # the group column, where groups are known
    with atomic_csv(path) as f:
        w = csv.writer(f)
        w.writerow(["path", coding.column, "split"] + (["group"] if grouped else []))
        for s, split in every:
            label = coding.text(s.label, splits.classes)
            w.writerow(
                [str(Path(s.path).absolute()), label, split] + ([s.group] if grouped else [])
            )


def read_splits(path: str | os.PathLike[str]) -> DataSplits:
    """The splits recorded by :func:`write_splits`: every file in the split and the order it
    had, nothing re-split. Classes are the sorted training labels, as :func:`discover` gives.
    Files that are gone are listed in ``skipped``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"splits file {display_path(path)} does not exist")
    if label_column(path) == "labels":  # label sets
        return read_multilabel_splits(path)
    rows, skipped = read_manifest(path)
    if any(split == "" for _, _, split in rows):
        raise DataError(
            f"{display_path(path)} has rows without a split: a splits file gives each file's "
            f"split (train, val or test); use it as a manifest with discover() instead"
        )
    by_split: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    for p, label, split in rows:
        by_split[split].setdefault(label, []).append(p)
    _check_classes(by_split["train"], path)
    classes = sorted(by_split["train"])
    for split in ("val", "test"):
        _to_samples(by_split[split], classes, split)  # refuses a class that training lacks
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for p, label, split in rows:  # in the recorded order, not grouped by class
        samples[split].append(Sample(p, index[label]))
    where = display_path(path)
    return DataSplits(
        classes,
        samples["train"],
        samples["val"],
        samples["test"],
        skipped=skipped,
        source=str(path),
        origins={s: f"{where} ({s} rows)" for s in SPLITS if samples[s]},
    )


def eval_samples(
    data: str | os.PathLike,
    classes: Sequence[str],
    *,
    task: str | LabelCoding = "single",
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The images to evaluate on: a folder of class folders, a data root whose test split
    (else its val split, by any of their usual folder names) is used, or a CSV manifest (its
    test rows, else all rows). Labels in the coding of the run's ``task`` (its name, or its
    :class:`LabelCoding`; multi-label: multi-hot tuples over ``classes``)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data path {display_path(root)} does not exist")
    _refuse_shards(root, "evaluation")
    coding = coding_for(task)
    if root.is_file() and label_column(root, coding) == "labels":
        if coding.column != "labels":  # label sets, and the task takes one label per image
            raise DataError(
                f"{display_path(root)} is a multi-label manifest (labels column), and this run "
                f"predicts one label per image: evaluate it with a path,label manifest"
            )
        return multilabel_eval_samples(root, classes)
    samples, skipped = _one_label_eval_samples(root, classes)
    k = len(classes)
    where = lambda s: lambda: display_path(s.path)  # noqa: E731
    return [Sample(s.path, coding.convert(s.label, k, where(s))) for s in samples], skipped


def _one_label_eval_samples(
    root: Path, classes: Sequence[str]
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Images to evaluate with one class index each, from folders or a ``path,label`` CSV."""
    if root.is_file():
        splits = _discover_csv(root, 0.0, 0.0, 0)
        samples = splits.test or splits.train + splits.val
        names = splits.classes
        remap = {i: list(classes).index(n) for i, n in enumerate(names) if n in classes}
        missing = sorted(set(names) - set(classes))
        if missing:
            raise DataError(
                f"{display_path(root)} has classes the model was not trained on: "
                f"{', '.join(map(display_text, missing))}"
            )
        return [Sample(s.path, remap[s.label]) for s in samples], splits.skipped
    folders, _ = find_split_folders(root)
    if "test" in folders or "val" in folders:
        root = folders.get("test") or folders["val"]
        log.info("evaluating on %s", display_path(root))
    elif "train" in folders:
        raise DataError(
            f"{display_path(root)} has a train folder but no test or val folder to evaluate on"
        )
    by_class = scan_class_folders(root)
    if not by_class:
        raise DataError(f"no class folders with images under {display_path(root)}")
    missing = sorted(set(by_class) - set(classes))
    if missing:
        raise DataError(
            f"{display_path(root)} has classes the model was not trained on: "
            f"{', '.join(map(display_text, missing))} (it knows {', '.join(classes)})"
        )
    return _to_samples(by_class, list(classes), display_path(root)), []

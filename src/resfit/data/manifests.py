"""CSV manifests: ``path,label[,split]`` rows, and the multi-label ``path,labels[,split]``
(an image's labels joined by ``;``; an empty field: none of the classes), read with the row
number of every problem, carved into splits, and read back from a run's ``splits.csv``.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import DataError
from ..core.labels import CODINGS, LabelCoding, coding_for
from .groups import CARVED_AT_RANDOM
from .paths import display_path, display_text, open_csv
from .samples import SPLIT_FOLDER_NAMES, SPLITS, DataSplits, Sample, split_of

__all__ = [
    "as_task",
    "discover_multilabel_csv",
    "label_column",
    "multilabel_eval_samples",
    "read_manifest",
    "read_multilabel_splits",
    "split_labels",
]


def read_manifest(path: Path) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """The rows of a ``path,label[,split]`` CSV as (file, label, split or ""), and the rows
    whose file is missing as skipped (path, reason)."""
    rows: list[tuple[Path, str, str]] = []
    skipped: list[tuple[str, str]] = []
    where = display_path(path)
    with open_csv(path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{where} needs a header with columns path,label (and optional split)")
        for line_no, row in enumerate(reader, start=2):
            p, split = _manifest_row(row, path, line_no)
            if not p.is_file():
                skipped.append(_missing(p, path, line_no))
                continue
            rows.append((p, (row["label"] or "").strip(), split))
    return rows, skipped


def _manifest_row(row: dict, path: Path, line_no: int) -> tuple[Path, str]:
    """A manifest row's file (relative to the CSV's folder) and split ("" if none); an empty
    path or an unknown split is a :class:`DataError` naming the row."""
    where = display_path(path)
    if not (row.get("path") or "").strip():
        raise DataError(f"{where}:{line_no}: the path is empty; give the image's path")
    p = Path(row["path"])
    p = p if p.is_absolute() else path.parent / p
    value = (row.get("split") or "").strip()
    split = split_of(value) if value else ""
    if split is None:
        raise DataError(
            f"{where}:{line_no}: split must be train, val or test (or "
            f"{', '.join(n for names in SPLIT_FOLDER_NAMES.values() for n in names[1:])}"
            f"), not {display_text(value)!r}"
        )
    return p, split


def _missing(p: Path, manifest: Path, line_no: int) -> tuple[str, str]:
    return str(p), f"listed in {display_path(manifest.name)}:{line_no} but missing"


# ---------------------------------------------------------------------------------------------
# Multi-label manifests: path,labels[,split], labels joined by ";"

_MLRow = tuple[Path, tuple[str, ...], str, int]  # file, label names, split or "", CSV line


def _header(path: Path) -> set[str]:
    with open_csv(path) as f:
        return {h.strip() for h in next(csv.reader(f), [])}


def label_column(path: Path, task: str | LabelCoding = "auto") -> str:
    """The column a manifest is read by: ``labels`` (label sets, ``;`` between labels) where
    its header has one, or where the task's coding holds label sets (``--task multilabel``
    reads a ``label`` column that way); else ``label`` (one class per row)."""
    if "labels" in _header(path) or task == "auto":
        return "labels" if "labels" in _header(path) else "label"
    return coding_for(task).column


def split_labels(text: str) -> tuple[str, ...]:
    """``"cat; dog;;cat"`` -> ``("cat", "dog")``: the distinct labels of a ``labels`` field."""
    return tuple(sorted({x.strip() for x in text.split(";") if x.strip()}))


def _read_multilabel_manifest(path: Path) -> tuple[list[_MLRow], list[tuple[str, str]]]:
    """The rows of a ``path,labels[,split]`` CSV and the rows whose file is missing (skipped,
    with the row named), validated as :func:`read_manifest` does."""
    rows: list[_MLRow] = []
    skipped: list[tuple[str, str]] = []
    with open_csv(path) as f:
        reader = csv.DictReader(f)
        fields = {h.strip() for h in reader.fieldnames or []}
        column = "labels" if "labels" in fields else "label"
        if "path" not in fields or column not in fields:
            raise DataError(
                f"{display_path(path)} needs a header with columns path,labels (and optional "
                f"split); labels are joined by ';'"
            )
        for line_no, row in enumerate(reader, start=2):
            p, split = _manifest_row(row, path, line_no)
            if not p.is_file():
                skipped.append(_missing(p, path, line_no))
                continue
            rows.append((p, split_labels(row[column] or ""), split, line_no))
    return rows, skipped


def _check_known(rows: Sequence[_MLRow], known: set[str], path: Path, what: str) -> None:
    """Every label of ``rows`` must be in ``known``; the first one that is not names its row."""
    for _, labels, _, line_no in rows:
        for label in labels:
            if label not in known:
                raise DataError(
                    f"{display_path(path)}:{line_no}: label {display_text(label)!r} {what}"
                )


def _carve_multilabel(rows: list[_MLRow], fractions: Sequence[float], seed: int) -> list[list]:
    """Split rows at random by ``fractions`` (the first part is the rest), never taking the
    last training image of a label: each label keeps at least one training image."""
    rng = random.Random(seed)
    order = list(rows)
    rng.shuffle(order)
    left = Counter(label for r in rows for label in r[1])
    parts: list[list[_MLRow]] = [[] for _ in range(len(fractions) + 1)]
    taken: set[int] = set()
    for i, frac in enumerate(fractions, start=1):
        want = max(1, round(len(rows) * frac))
        for j, r in enumerate(order):
            if len(parts[i]) >= want:
                break
            if j not in taken and all(left[label] > 1 for label in r[1]):
                parts[i].append(r)
                taken.add(j)
                left.subtract(r[1])
    parts[0] = [r for j, r in enumerate(order) if j not in taken]
    return parts


def _multi_hot(rows: Sequence[_MLRow], classes: Sequence[str]) -> list[Sample]:
    return [Sample(p, tuple(int(c in labels) for c in classes)) for p, labels, _, _ in rows]


def discover_multilabel_csv(
    path: Path, val_fraction: float, test_fraction: float, seed: int
) -> DataSplits:
    rows, skipped = _read_multilabel_manifest(path)
    where = display_path(path)
    by_split = {s: [r for r in rows if (r[2] or "train") == s] for s in SPLITS}
    classes = sorted({label for r in by_split["train"] for label in r[1]})
    if not classes:
        raise DataError(f"{where}: no train row has a label (labels are joined by ';')")
    fix = "has no training image: add train rows that carry it, or remove it from this row"
    _check_known(rows, set(classes), path, fix)
    train, val, test = by_split["train"], by_split["val"], by_split["test"]
    origins = {s: f"{where} ({s} rows)" for s in SPLITS if by_split[s]}
    if not val:
        fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 and not test else [])
        parts = _carve_multilabel(train, fractions, seed)
        train, val = parts[0], parts[1]
        note = f"{val_fraction:.0%} of the train rows of {where}, {CARVED_AT_RANDOM} {seed}"
        origins["val"] = note
        if len(parts) > 2:
            test = parts[2]
            origins["test"] = note.replace(f"{val_fraction:.0%}", f"{test_fraction:.0%}")
    return DataSplits(classes, _multi_hot(train, classes), _multi_hot(val, classes),
                      _multi_hot(test, classes), skipped=skipped, source=str(path),
                      origins=origins, task="multilabel")  # fmt: skip


def as_task(splits: DataSplits, task: str) -> DataSplits:
    """``splits`` as the ``task`` asks: its labels in the task's coding (one-label data as
    multi-hot for ``"multilabel"``; multi-label data as class indices for ``"single"``, each
    image with one label), and ``splits.task`` the task's name. ``"auto"``: as they are."""
    import dataclasses

    if task == "auto" or task == splits.task:
        return splits
    coding, k = CODINGS.get(task), len(splits.classes)
    if coding is CODINGS.get(splits.task):  # same labels, another task (a registered one)
        return dataclasses.replace(splits, task=task)
    new = {s: [Sample(x.path, coding.convert(x.label, k, lambda x=x: display_path(x.path)))
               for x in getattr(splits, s)] for s in SPLITS}  # fmt: skip
    return dataclasses.replace(splits, **new, task=task)


def read_multilabel_splits(path: Path) -> DataSplits:
    """:func:`read_splits` for a multi-label ``splits.csv`` (``path,labels,split``)."""
    rows, skipped = _read_multilabel_manifest(path)
    classes = sorted({label for r in rows if r[2] == "train" for label in r[1]})
    _check_known(rows, set(classes), path, "has no training image in this splits file")
    where = display_path(path)
    samples = {s: _multi_hot([r for r in rows if r[2] == s], classes) for s in SPLITS}
    return DataSplits(classes, samples["train"], samples["val"], samples["test"],
                      skipped=skipped, source=str(path), task="multilabel",
                      origins={s: f"{where} ({s} rows)" for s in SPLITS if samples[s]})  # fmt: skip


def multilabel_eval_samples(
    path: Path, classes: Sequence[str]
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The test rows of a multi-label manifest (all rows if none is a test row), as multi-hot
    vectors over the run's ``classes``; a label the run does not know names its row."""
    rows, skipped = _read_multilabel_manifest(path)
    rows = [r for r in rows if r[2] == "test"] or rows
    _check_known(
        rows, set(classes), path, f"is not one of the run's classes ({', '.join(classes)})"
    )
    return _multi_hot(rows, classes), skipped

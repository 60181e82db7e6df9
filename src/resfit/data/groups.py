"""Groups of images that belong together (a patient, a study, a camera, a recording), read from
a manifest column or a DICOM tag, and the group-aware split that keeps every group in one split.

The split is the greedy assignment behind scikit-learn's ``StratifiedGroupKFold``: groups, the
largest first, each go to the split whose class counts it brings closest to that split's target
(its fraction of every class), so the class balance holds as far as the groups allow. Unlike
k folds it takes any fractions (``--val-fraction 0.15``). The same column or tag also gives each
image's slice for metrics per group (``--slice-by``).
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.errors import DataError
from .dicom import dicom_tags, is_dicom
from .paths import display_path, open_csv
from .samples import DataSplits, Sample

__all__ = [
    "CARVED",
    "CARVED_AT_RANDOM",
    "DEFAULT_GROUP_TAGS",
    "group_split",
    "read_values",
    "regroup",
]

# What the origin of a split carved out of train says (discovery's note; a multi-label
# manifest's carve is at random), so regrouping knows which splits it may redraw and which the
# user made by hand.
CARVED = "stratified, seed"
CARVED_AT_RANDOM = "at random, seed"
_CARVED_MARKS = (CARVED, CARVED_AT_RANDOM)

# What groups DICOM images when no --group-by is given: the patient, else the study.
DEFAULT_GROUP_TAGS = ("PatientID", "StudyInstanceUID")


def _manifest_column(manifest: Path, column: str) -> dict[Path, str]:
    """``column`` of a CSV manifest by resolved image path; a missing column names both."""
    with open_csv(manifest) as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in reader.fieldnames or []]
        if column not in fields:
            raise DataError(
                f"{display_path(manifest)} has no column {column!r} (--group-by/--slice-by); "
                f"its columns are {', '.join(fields)}"
            )
        out = {}
        for row in reader:
            p = Path((row.get("path") or "").strip())
            p = p if p.is_absolute() else manifest.parent / p
            out[p.resolve()] = (row.get(column) or "").strip()
    return out


def _dicom_values(paths: Sequence[Path], tags: Sequence[str]) -> list[str]:
    """The first of ``tags`` present in each DICOM file's header ("" for other files or none)."""
    out = []
    for p in paths:
        if not is_dicom(p):
            out.append("")
            continue
        try:
            found = dicom_tags(Path(p), tuple(tags))
        except Exception:  # an unreadable header: the decoder skips the file with its reason
            found = {}
        out.append(next((found[t] for t in tags if found.get(t)), ""))
    return out


def read_values(data: str | Path, paths: Sequence[Path], column: str | None) -> list[str] | None:
    """Each image's value of ``column``: a column of the CSV manifest ``data``, else a DICOM
    tag of each file. ``column=None``: a manifest's ``group`` column, else the DICOM files'
    PatientID (or StudyInstanceUID); None where there is nothing to group by.

    A named column found neither in the manifest nor in any DICOM file is a
    :class:`DataError` naming the column."""
    data = Path(data)
    is_csv = data.is_file() and data.suffix.lower() == ".csv"
    if is_csv and (column or _has_column(data, "group")):
        by_path = _manifest_column(data, column or "group")
        return [by_path.get(Path(p).resolve(), "") for p in paths]
    if not any(is_dicom(p) for p in paths):
        if column:
            raise DataError(
                f"--group-by/--slice-by {column}: {display_path(data)} is not a CSV manifest "
                f"with that column and holds no DICOM files with that tag"
            )
        return None
    values = _dicom_values(paths, (column,) if column else DEFAULT_GROUP_TAGS)
    if not any(values):
        if column:
            raise DataError(f"no DICOM file under {display_path(data)} has the tag {column!r}")
        return None
    return values


def _has_column(manifest: Path, column: str) -> bool:
    with open_csv(manifest) as f:
        return column in [h.strip() for h in next(csv.reader(f), [])]


def _cost(brings: Counter, have: Counter, target: dict) -> float:
    """How much further from its targets a part moves when a group joins it (squared error)."""
    return sum(
        (have[c] + n - target[c]) ** 2 - (have[c] - target[c]) ** 2 for c, n in brings.items()
    )


def group_split(
    samples: Sequence[Sample],
    fractions: Sequence[float],
    seed: int,
    classes_of: Callable[[object], Sequence[int]],
) -> list[list[Sample]]:
    """``samples`` (each with a ``group``; "" is a group of its own) cut into
    ``len(fractions) + 1`` parts, the first the rest (train): no group in two parts, each
    part's classes as near its fraction of the whole as the groups allow."""
    members: dict[str, list[Sample]] = {}
    for i, s in enumerate(samples):
        members.setdefault(s.group or f"\0{i}", []).append(s)
    shares = [1 - sum(fractions), *fractions]
    total = Counter(c for s in samples for c in classes_of(s.label))
    target = [{c: n * f for c, n in total.items()} for f in shares]
    counts: list[Counter] = [Counter() for _ in shares]
    order = list(members)
    random.Random(seed).shuffle(order)  # ties broken by the seed, then the largest first
    order.sort(key=lambda g: -len(members[g]))
    parts: list[list[Sample]] = [[] for _ in shares]
    for g in order:
        brings = Counter(c for s in members[g] for c in classes_of(s.label))

        k = min(range(len(shares)), key=lambda k: _cost(brings, counts[k], target[k]))
        counts[k].update(brings)
        parts[k].extend(members[g])
    return parts


def regroup(
    splits: DataSplits,
    data: str | Path,
    group_by: str | None,
    fractions: dict[str, float],
    seed: int,
    classes_of: Callable[[object], Sequence[int]],
) -> DataSplits:
    """Give every sample its group (:func:`read_values`) and redraw the splits that were carved
    out of train (``fractions``: theirs) so that no group is in two of them; splits made by
    hand (folders, a manifest's split column) stay as they are, and the leakage check reports
    any group they share."""
    everything = [s for name in ("train", "val", "test") for s in getattr(splits, name)]
    values = read_values(data, [s.path for s in everything], group_by)
    if values is None:
        return splits
    for s, v in zip(everything, values, strict=True):
        s.group = v
    carved = [n for n in ("val", "test") if any(m in splits.origins.get(n, "") for m in _CARVED_MARKS)]  # fmt: skip
    if not carved:
        return splits
    pool = splits.train + [s for n in carved for s in getattr(splits, n)]
    parts = group_split(pool, [fractions[n] for n in carved], seed, classes_of)
    splits.train = parts[0]
    what = group_by or "the group column or DICOM PatientID"
    for name, part in zip(carved, parts[1:], strict=True):
        setattr(splits, name, part)
        for mark in _CARVED_MARKS:  # the group split is stratified, single- or multi-label
            splits.origins[name] = splits.origins[name].replace(mark, f"by {what} groups, {CARVED}")
    return splits

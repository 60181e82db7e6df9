"""Group-aware splits (--group-by) on 2,000 cifar10-jpg photos in 400 groups: no group in two
splits, each split's class balance within 3 points of the whole; splits.csv records the group;
a hand split that shares groups is reported by the leakage check; a missing column is one
error naming it."""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from pathlib import Path

import pytest

from resfit.core.errors import DataError
from resfit.data.discovery import discover, write_splits
from resfit.quality.leakage import shared_groups


def _manifest(cifar10_root: Path, path: Path, split_of=None) -> Path:
    """2,000 photos (200 per class) in 400 groups of 5: 300 groups of one class (a patient
    with one diagnosis) and 100 of mixed classes, in a seeded random row order."""
    classes = sorted(d.name for d in (cifar10_root / "train").iterdir())
    photos = {c: sorted((cifar10_root / "train" / c).glob("*.jpg"))[:200] for c in classes}
    rows = []
    for c in classes:  # 150 photos of each class in pure groups: 30 groups per class
        rows += [(p, c, f"{c}-{i // 5}") for i, p in enumerate(photos[c][:150])]
    rest = [(p, c) for c in classes for p in photos[c][150:]]
    random.Random(1).shuffle(rest)
    rows += [(p, c, f"mixed-{i // 5}") for i, (p, c) in enumerate(rest)]
    random.Random(2).shuffle(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"] + (["split"] if split_of else []))
        for p, c, g in rows:
            w.writerow([p, c, g] + ([split_of(g)] if split_of else []))
    return path


def _balance(samples) -> Counter:
    n = len(samples)
    return Counter({k: v / n for k, v in Counter(s.label for s in samples).items()})


def test_group_split_keeps_groups_whole_and_classes_balanced(cifar10_root, tmp_path) -> None:
    manifest = _manifest(cifar10_root, tmp_path / "m.csv")
    splits = discover(manifest, val_fraction=0.15, test_fraction=0.15, seed=0, group_by="patient")
    every = splits.train + splits.val + splits.test
    assert len(every) == 2000 and len({s.group for s in every}) == 400
    assert (
        shared_groups({n: [s.group for s in getattr(splits, n)] for n in ("train", "val", "test")})
        == {}
    )
    whole = _balance(every)
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        assert abs(len(part) / 2000 - (0.7 if name == "train" else 0.15)) < 0.02
        worst = max(abs(_balance(part)[c] - whole[c]) for c in whole)
        assert worst <= 0.03, (name, worst)
    assert "patient groups" in splits.origins["val"]
    write_splits(tmp_path / "splits.csv", splits)
    rows = list(csv.DictReader(open(tmp_path / "splits.csv")))
    assert len({(r["group"], r["split"]) for r in rows}) == 400  # one split per group


def test_without_groups_the_split_shares_them(cifar10_root, tmp_path) -> None:
    """The check that the test above can fail: the plain stratified split scatters groups."""
    manifest = _manifest(cifar10_root, tmp_path / "m.csv")
    splits = discover(manifest, val_fraction=0.15, seed=0)
    groups = {r["path"]: r["patient"] for r in csv.DictReader(open(manifest))}
    by_split = {n: [groups[str(s.path)] for s in getattr(splits, n)] for n in ("train", "val")}
    assert len(shared_groups(by_split)) > 100


def test_hand_split_sharing_groups_is_reported(cifar10_root, tmp_path, caplog) -> None:
    from resfit.training.setup import check_leakage

    # The groups ending in -1 go to val, the rest to train; then one more photo of the train
    # group airplane-0 goes to val: the hand split shares that group.
    def split_of(g: str) -> str:
        return "val" if g.endswith("-1") else "train"

    manifest = _manifest(cifar10_root, tmp_path / "m.csv", split_of)
    lines = open(manifest).read().splitlines()
    extra = next(x for x in lines if ",airplane-0," in x).replace(",train", ",val")
    (tmp_path / "dup").mkdir()
    copy = tmp_path / "dup" / "copy.jpg"  # rotated: a pHash duplicate would be reported anyway
    from PIL import Image

    Image.open(extra.split(",")[0]).rotate(90).save(copy)
    (tmp_path / "m.csv").write_text("\n".join([*lines, f"{copy},airplane,airplane-0,val"]) + "\n")
    splits = discover(manifest, group_by="patient")
    with caplog.at_level(logging.WARNING, logger="resfit"):
        check_leakage(splits, "report")
    assert "1 group(s) have images in more than one split (airplane-0: train/val)" in caplog.text


def test_missing_group_column_is_one_error(cifar10_root, tmp_path) -> None:
    manifest = _manifest(cifar10_root, tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"m\.csv has no column 'PatientID'.*patient"):
        discover(manifest, group_by="PatientID")
    with pytest.raises(DataError, match="PatientID"):
        discover(cifar10_root / "test", group_by="PatientID")


def test_group_by_keeps_groups_whole_in_a_multilabel_manifest(tmp_path: Path) -> None:
    """A path,labels manifest carves its val split by groups too (it was carved at random)."""
    rows = [(f"img{i}.jpg", ["a;b", "a", "b"][i % 3], f"g{i // 4}") for i in range(120)]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "patient"])
        w.writerows(rows)
    for name, _, _ in rows:
        (tmp_path / name).write_bytes(b"x")  # discovery reads no pixel
    splits = discover(tmp_path / "m.csv", val_fraction=0.25, seed=0, group_by="patient")
    assert splits.task == "multilabel" and "by patient groups" in splits.origins["val"]
    groups = {n: [s.group for s in getattr(splits, n)] for n in ("train", "val")}
    assert len(set(groups["train"])) + len(set(groups["val"])) == 30  # no group in both
    assert shared_groups(groups) == {} and 20 <= len(splits.val) <= 40

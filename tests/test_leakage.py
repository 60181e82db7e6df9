"""Duplicate / leakage scan on real flower photos and edited copies of them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from resfit.data.fingerprints import hamming, hash_image, phash
from resfit.quality.leakage import Duplicate, find_duplicates, remove_leaks

pytestmark = pytest.mark.shared


@pytest.fixture()
def leak_splits(flowers_root: Path, tmp_path: Path) -> dict[str, dict[str, Path]]:
    """train: two originals; val: copies of one of them made in different ways, plus a stranger."""
    original = sorted((flowers_root / "train" / "daisy").glob("*.jpg"))[0]
    bystander = sorted((flowers_root / "train" / "tulips").glob("*.jpg"))[0]
    stranger = sorted((flowers_root / "val" / "roses").glob("*.jpg"))[0]
    val = tmp_path / "val"
    val.mkdir()
    byte_copy = val / "byte_copy.jpg"
    shutil.copyfile(original, byte_copy)

    with Image.open(original) as im:
        im = im.convert("RGB")
        # Re-encoded at another quality, 70 % of the size and 10 % brighter.
        edited = im.resize((im.width * 7 // 10, im.height * 7 // 10), Image.Resampling.BICUBIC)
        edited = ImageEnhance.Brightness(edited).enhance(1.1)
        near_copy = val / "near_copy.jpg"
        edited.save(near_copy, quality=70)
        # Pixels stored rotated, with the EXIF tag that tells viewers to rotate them back
        # (what phones write): the same picture once the orientation is applied.
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        rotated_copy = val / "rotated_copy.jpg"
        im.transpose(Image.Transpose.ROTATE_90).save(rotated_copy, quality=90, exif=exif)
        raw_rotated = phash(im.transpose(Image.Transpose.ROTATE_90))
        unrotated = phash(im)
    # The rotated test is only meaningful if ignoring the tag would miss the copy.
    assert hamming(raw_rotated, unrotated) > 10

    return {
        "train": {"original": original, "bystander": bystander},
        "val": {
            "byte_copy": byte_copy,
            "near_copy": near_copy,
            "rotated_copy": rotated_copy,
            "stranger": stranger,
        },
    }


def _as_splits(named: dict[str, dict[str, Path]]) -> dict[str, list[Path]]:
    return {split: list(files.values()) for split, files in named.items()}


def test_finds_exact_and_near_copies_and_nothing_else(leak_splits) -> None:
    dups = find_duplicates(_as_splits(leak_splits), max_distance=4)
    by_copy = {d.path_b: d for d in dups}
    original = leak_splits["train"]["original"]
    val = leak_splits["val"]

    assert set(by_copy) == {val["byte_copy"], val["near_copy"], val["rotated_copy"]}
    assert all(d.split_a == "train" and d.split_b == "val" and d.path_a == original for d in dups)
    assert by_copy[val["byte_copy"]].kind == "exact"
    assert by_copy[val["byte_copy"]].distance == 0
    for name in ("near_copy", "rotated_copy"):
        assert by_copy[val[name]].kind == "near"
        assert by_copy[val[name]].distance <= 4
    # The unrelated photo is far from everything.
    stranger = hash_image(val["stranger"]).phash
    assert stranger is not None
    assert hamming(stranger, hash_image(original).phash) > 10
    json.dumps([d.to_dict() for d in dups])  # serialisable for reports / logs


def test_remove_leaks_keeps_train_and_drops_the_copies(leak_splits) -> None:
    splits = _as_splits(leak_splits)
    kept, dropped = remove_leaks(splits, max_distance=4)
    val = leak_splits["val"]
    assert kept["train"] == splits["train"]
    assert dropped["train"] == []
    assert kept["val"] == [val["stranger"]]
    assert set(dropped["val"]) == {val["byte_copy"], val["near_copy"], val["rotated_copy"]}


def test_remove_leaks_priority_order() -> None:
    a, b, c = Path("a.jpg"), Path("b.jpg"), Path("c.jpg")
    # A pair listed with the lower-priority split first still loses the lower-priority copy.
    dups = [
        Duplicate("test", a, "train", b, "near", 3),
        Duplicate("val", c, "test", a, "exact", 0),
    ]
    kept, dropped = remove_leaks({"test": [a], "train": [b], "val": [c]}, dups)
    assert dropped == {"test": [a], "train": [], "val": []}
    assert kept == {"test": [], "train": [b], "val": [c]}


def test_unreadable_files_do_not_stop_the_scan(leak_splits, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    splits = _as_splits(leak_splits)
    splits["val"] = [*splits["val"], broken, tmp_path / "missing.jpg"]
    assert hash_image(broken).phash is None
    dups = find_duplicates(splits)
    assert len(dups) == 3


def test_real_leak_in_flowers5(flowers_root: Path) -> None:
    """The published flowers split has the same daisy photo in train and val (seen by eye)."""
    splits = {s: sorted((flowers_root / s / "daisy").glob("*.jpg")) for s in ("train", "val")}
    pairs = {(d.path_a.name, d.path_b.name) for d in find_duplicates(splits)}
    assert ("10466290366_cc72e33532.jpg", "10994032453_ac7f8d9e2e.jpg") in pairs


def test_odd_file_names_are_logged_readably(tmp_path: Path, capsys) -> None:
    # Issue 13, defect 1: a name that is not UTF-8 broke a strict UTF-8 log (a run's train.log).
    odd = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    odd.write_bytes(b"not a picture")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "ok.png")
    handler = logging.FileHandler(tmp_path / "train.log", encoding="utf-8")
    logging.getLogger("resfit").addHandler(handler)
    try:
        found = find_duplicates({"train": [odd], "val": [tmp_path / "ok.png"]})
    finally:
        logging.getLogger("resfit").removeHandler(handler)
        handler.close()
    assert found == []
    assert "cannot decode" in (tmp_path / "train.log").read_text(encoding="utf-8")
    assert "caf\\xe9.jpg" in (tmp_path / "train.log").read_text(encoding="utf-8")
    assert "Logging error" not in capsys.readouterr().err


def test_embedding_signal_finds_a_crop_that_phash_misses(
    flowers_root: Path, tmp_path: Path
) -> None:
    from resfit.inference.embed import Embedder
    from resfit.quality.leakage import similarity_threshold
    from tests.conftest import CIFAR_CKPTS, need

    weights = need(CIFAR_CKPTS / "resnet56-4bfd9763.th")
    daisies = sorted((flowers_root / "train" / "daisy").glob("*.jpg"))
    original, others = daisies[0], daisies[1:6]  # the negatives: other photos of daisies
    crop = tmp_path / "crop.jpg"
    with Image.open(original) as im:
        w, h = im.width * 8 // 10, im.height * 8 // 10  # 80 % of each side, top-left window
        im.convert("RGB").crop((0, 0, w, h)).save(crop, quality=90)
    # The test is only meaningful if the hash misses this copy.
    assert hamming(hash_image(original).phash, hash_image(crop).phash) > 4
    splits = {"train": [original, *others[:2]], "val": [crop, *others[2:]]}
    assert find_duplicates(splits) == []

    embedder = Embedder.from_weights("resnet56_cifar", str(weights), precision="fp32")
    found = find_duplicates(splits, embedder=embedder)
    _, emb, _ = embedder.embed([*splits["train"], *splits["val"]])
    sims = emb[:3] @ emb[3:].T  # train x val
    assert (original, crop, "embed") in [(d.path_a, d.path_b, d.kind) for d in found], sims
    pair = next(d for d in found if d.path_b == crop)
    assert pair.distance > 4 and pair.similarity == pytest.approx(sims[0, 0], abs=1e-4)
    # The crop is its photo's closest image across the splits, and closer than any two
    # distinct daisies within a split: the threshold find_duplicates measured.
    assert sims[0, 0] == sims.max()
    assert sims[0, 0] > similarity_threshold([emb[:3], emb[3:]])


def test_training_removes_a_crop_with_leakage_signal_both(
    flowers_root: Path, tmp_path: Path
) -> None:
    from resfit.core.config import TrainConfig
    from resfit.data.discovery import discover
    from resfit.training.setup import check_leakage, resolve
    from tests.conftest import CIFAR_CKPTS, need

    weights = need(CIFAR_CKPTS / "resnet56-4bfd9763.th")
    for cls in ("daisy", "tulips"):
        photos = sorted((flowers_root / "train" / cls).glob("*.jpg"))[:4]
        for split, chosen in (("train", photos[:2]), ("val", photos[2:])):
            (tmp_path / split / cls).mkdir(parents=True)
            for f in chosen:
                shutil.copyfile(f, tmp_path / split / cls / f.name)
    original = sorted((tmp_path / "train" / "daisy").glob("*.jpg"))[0]
    crop = tmp_path / "val" / "daisy" / "crop.jpg"
    with Image.open(original) as im:
        im.convert("RGB").crop((0, 0, im.width * 8 // 10, im.height * 8 // 10)).save(crop)
    splits = discover(str(tmp_path))
    cfg = TrainConfig().replace(data=str(tmp_path), arch="resnet56_cifar", weights=str(weights),
                                leakage="remove", leakage_signal="both")  # fmt: skip
    cfg, model = resolve(cfg, splits)
    dups = check_leakage(splits, "remove", cfg, model)
    assert (original, crop, "embed") in [(d.path_a, d.path_b, d.kind) for d in dups]
    assert crop not in [x.path for x in splits.val] and len(splits.train) == 4


def test_embedding_signal_needs_pretrained_weights() -> None:
    from resfit.core.config import TrainConfig
    from resfit.core.errors import ConfigError
    from resfit.training.setup import _leakage_embedder

    with pytest.raises(ConfigError, match="--weights"):
        _leakage_embedder(TrainConfig().replace(leakage_signal="both"), None)

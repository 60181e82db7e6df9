"""Finding, splitting and decoding images: layouts, odd formats and broken files."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.core.errors import DataError
from resfit.data.datasets import decode_all
from resfit.data.decode import DecodeError, load_image
from resfit.data.discovery import discover, eval_samples, read_splits, write_splits
from resfit.data.paths import display_path, display_text, find_images, open_csv, write_skipped

from .images import COLOURS, colour_image, make_colour_folder, write_broken_files


def test_train_val_test_layout(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=4, splits=("train", "val", "test"))
    s = discover(tmp_path)
    assert s.classes == ["blue", "green", "red"]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 12, 12)
    assert {x.label for x in s.val} == {0, 1, 2}


def test_single_folder_is_split_stratified_and_reproducibly(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=20, splits=("",))
    a = discover(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    b = discover(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    c = discover(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert [x.path for x in a.val] == [x.path for x in b.val] != [x.path for x in c.val]
    assert a.counts()["val"] == {"blue": 4, "green": 4, "red": 4}
    assert a.counts()["test"] == {"blue": 2, "green": 2, "red": 2}
    every = {x.path for x in a.train} | {x.path for x in a.val} | {x.path for x in a.test}
    assert len(every) == 60 == len(a.train) + len(a.val) + len(a.test)


def test_missing_val_split_is_carved_from_train(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=10, splits=("train",))
    s = discover(tmp_path, val_fraction=0.3)
    assert len(s.val) == 9 and len(s.train) == 21


def test_csv_manifest(tmp_path: Path) -> None:
    make_colour_folder(tmp_path / "imgs", per_class=5, splits=("",))
    lines = ["path,label,split"]
    for i, p in enumerate(sorted((tmp_path / "imgs").rglob("*.png"))):
        lines.append(
            f"imgs/{p.parent.name}/{p.name},{p.parent.name},{'val' if i % 5 == 0 else 'train'}"
        )
    lines.append("imgs/red/missing.png,red,train")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    s = discover(tmp_path / "m.csv")
    assert s.classes == ["blue", "green", "red"]
    assert len(s.val) == 3 and len(s.train) == 12
    assert s.skipped and "missing.png" in s.skipped[0][0]


def test_bad_layouts_give_clear_errors(tmp_path: Path, caplog) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "one" / "cats").mkdir(parents=True)
    colour_image((1, 2, 3), np.random.default_rng(0)).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(DataError, match="single class"):
        discover(tmp_path / "one")
    make_colour_folder(tmp_path / "d", per_class=3, splits=("train",))
    (tmp_path / "d" / "val" / "purple").mkdir(parents=True)
    colour_image((90, 0, 90), np.random.default_rng(0)).save(
        tmp_path / "d" / "val" / "purple" / "x.png"
    )
    with pytest.raises(DataError, match="classes that training does not: purple"):
        discover(tmp_path / "d")
    make_colour_folder(tmp_path / "e", per_class=3, splits=("train",))
    (tmp_path / "e" / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="resfit"):
        s = discover(tmp_path / "e")
    assert "empty" not in s.classes and "ignoring empty class folder" in caplog.text


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return img.getpixel(xy)


def test_odd_but_valid_images_are_converted_as_a_person_sees_them(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (8, 6), (200, 100, 50))
    cases: dict[str, tuple[Image.Image, str, tuple[int, int, int]]] = {
        "grey.png": (Image.new("L", (8, 6), 77), "PNG", (77, 77, 77)),
        "palette.gif": (rgb.convert("P"), "GIF", None),
        "cmyk.jpg": (Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        "tiny.bmp": (Image.new("RGB", (1, 1), (10, 20, 30)), "BMP", (10, 20, 30)),
        "photo.webp": (rgb, "WEBP", (200, 100, 50)),
        "scan.tiff": (rgb, "TIFF", (200, 100, 50)),
    }
    for name, (img, fmt, expected) in cases.items():
        img.save(tmp_path / name, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out = load_image(tmp_path / name)
        assert out.mode == "RGB"
        if expected:
            assert all(
                abs(a - b) <= 3 for a, b in zip(_pixel(out, (0, 0)), expected, strict=True)
            ), name
    # 16-bit: scaled to 8 bits, not clipped to white
    arr = np.full((6, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert _pixel(load_image(tmp_path / "deep.png"), (0, 0)) == (128, 128, 128)
    # RGBA: transparent pixels composited on white
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    out = load_image(tmp_path / "alpha.png")
    assert _pixel(out, (0, 0)) == (255, 255, 255) and _pixel(out, (1, 1)) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert sum(_pixel(out, (10, 5))) > 600 and sum(_pixel(out, (10, 35))) < 100


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, b = _pixel(load_image(tmp_path / "a.gif"), (0, 0))
    assert r > 200 and b < 50


def test_broken_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    broken = write_broken_files(tmp_path / "bad")
    for p in broken:
        with pytest.raises(DecodeError):
            load_image(p)
    from resfit.data.samples import Sample

    good = tmp_path / "good.png"
    colour_image((1, 2, 3), np.random.default_rng(0)).save(good)
    decoded = decode_all([Sample(p, 0) for p in [*broken, good]], 16, progress=False)
    assert decoded.paths == [good] and decoded.images[0].shape == (3, 16, 16)
    reasons = dict(decoded.skipped)
    assert set(reasons) == {str(p) for p in broken}
    assert "empty" in reasons[str(tmp_path / "bad" / "empty.jpg")]
    assert "decompression bomb" in reasons[str(tmp_path / "bad" / "bomb.png")]


def test_find_images_takes_files_folders_and_globs(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=2, splits=("",))
    assert len(find_images([str(tmp_path)])) == 6
    assert (
        len(find_images([str(tmp_path / "red" / "*.png"), str(tmp_path / "blue" / "000.png")])) == 3
    )
    with pytest.raises(DataError, match="no such file"):
        find_images([str(tmp_path / "zzz*.png")])


def test_eval_samples_uses_the_test_split_and_checks_classes(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=2, splits=("train", "test"))
    samples, _ = eval_samples(tmp_path, ["blue", "green", "red"])
    assert all("/test/" in str(s.path) for s in samples) and len(samples) == 6
    with pytest.raises(DataError, match="not trained on"):
        eval_samples(tmp_path, ["blue", "green"])


# ---------------------------------------------------------------------------------------------
# Split folders by their usual names (issue 13, defect 2)


def test_validation_folder_is_the_val_split_and_the_choice_is_logged(
    tmp_path: Path, caplog
) -> None:
    # The old code looked for val/ only: validation/ was ignored without a word and 15 % of
    # train held out instead.
    make_colour_folder(tmp_path, per_class=4, splits=("train", "validation"))
    with caplog.at_level(logging.INFO, logger="resfit"):
        s = discover(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 12, 0)
    assert all(x.path.parts[-3] == "validation" for x in s.val)
    assert f"val <- {tmp_path / 'validation'}" in caplog.text
    assert f"train <- {tmp_path / 'train'}" in caplog.text
    assert "test <- none" in caplog.text


def test_split_folder_names_are_recognised_in_any_case(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=3, splits=("Training", "VALID", "Testing"))
    s = discover(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 9, 9)
    assert {x.path.parts[-3] for x in s.test} == {"Testing"}
    assert s.origins == {
        "train": str(tmp_path / "Training"),
        "val": str(tmp_path / "VALID"),
        "test": str(tmp_path / "Testing"),
    }
    samples, _ = eval_samples(tmp_path, s.classes)
    assert {x.path.parts[-3] for x in samples} == {"Testing"}


def test_unused_top_level_folders_are_named_in_a_warning(tmp_path: Path, caplog) -> None:
    make_colour_folder(tmp_path, per_class=3, splits=("train", "val", "extras"))
    colour_image((1, 2, 3), np.random.default_rng(0)).save(tmp_path / "stray.png")
    with caplog.at_level(logging.WARNING, logger="resfit"):
        s = discover(tmp_path)
    assert "extras" not in s.classes and len(s.val) == 9
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"ignoring {tmp_path / 'extras'}/: not a split folder" in w for w in warned)
    assert any("ignoring 1 image(s) directly in" in w for w in warned)


def test_two_folders_for_one_split_are_refused(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=2, splits=("train", "val", "Validation"))
    with pytest.raises(DataError, match=r"2 folders for the val split: Validation/ and val/"):
        discover(tmp_path)


def test_split_folders_without_train_are_refused(tmp_path: Path) -> None:
    # Before, val/ and test/ became two classes of a flat layout.
    make_colour_folder(tmp_path, per_class=2, splits=("val", "test"))
    with pytest.raises(DataError, match=r"has test/, val/ but no train/"):
        discover(tmp_path)


def test_test_fraction_is_carved_from_train_when_there_is_no_test_folder(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, per_class=10, splits=("train",))
    a = discover(tmp_path, val_fraction=0.2, seed=1)
    b = discover(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert [x.path for x in b.val] == [x.path for x in a.val]  # val does not move
    assert (len(b.train), len(b.val), len(b.test)) == (18, 6, 6)
    assert "20% of" in b.origins["test"]


def test_manifest_split_values_take_the_usual_names(tmp_path: Path) -> None:
    make_colour_folder(tmp_path / "imgs", per_class=3, splits=("",))
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    lines = ["path,label,split"] + [
        f"{p.relative_to(tmp_path)},{p.parent.name},{['Training', 'validation', 'TEST'][i % 3]}"
        for i, p in enumerate(files)
    ]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    s = discover(tmp_path / "m.csv")
    assert (len(s.train), len(s.val), len(s.test)) == (3, 3, 3)
    (tmp_path / "bom.csv").write_text("\ufeff" + "\n".join(lines) + "\n")  # as Excel saves it
    assert len(discover(tmp_path / "bom.csv").val) == 3
    (tmp_path / "bad.csv").write_text(f"path,label,split\n{files[0]},red,holdout\n")
    with pytest.raises(DataError, match=r"bad.csv:2: split must be train, val or test"):
        discover(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------
# splits.csv and file names that are not UTF-8 (issue 13, defects 1 and 2)

ODD = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not UTF-8, so Python holds '\udce9'


def _with_odd_names(root: Path) -> Path:
    make_colour_folder(root, per_class=4, splits=("train", "val"))
    colour_image(COLOURS["red"], np.random.default_rng(7)).save(root / "train" / "red" / ODD)
    colour_image(COLOURS["blue"], np.random.default_rng(8)).save(root / "val" / "blue" / ODD)
    return root


def test_splits_csv_round_trips_every_file_and_its_split(tmp_path: Path) -> None:
    s = discover(_with_odd_names(tmp_path / "data"), seed=2)
    write_splits(tmp_path / "splits.csv", s)
    back = read_splits(tmp_path / "splits.csv")
    assert back.classes == s.classes
    for split in ("train", "val", "test"):
        assert [(x.path, x.label) for x in getattr(back, split)] == [
            (x.path.absolute(), x.label) for x in getattr(s, split)
        ]
    assert (tmp_path / "data" / "train" / "red" / ODD) in [x.path for x in back.train]
    # The odd name is kept as its own bytes, and the file is also a manifest for discover().
    raw = (tmp_path / "splits.csv").read_bytes()
    assert b"caf\xe9.png,red,train" in raw and raw.startswith(b"path,label,split\r\n")
    again = discover(tmp_path / "splits.csv")
    assert [x.path for x in again.val] == [x.path for x in back.val]


def test_read_splits_lists_missing_files_and_refuses_rows_without_a_split(tmp_path: Path) -> None:
    s = discover(_with_odd_names(tmp_path / "data"))
    write_splits(tmp_path / "splits.csv", s)
    gone = s.val[0].path
    gone.unlink()
    back = read_splits(tmp_path / "splits.csv")
    assert [p for p, _ in back.skipped] == [str(gone)]
    assert len(back.val) == len(s.val) - 1
    (tmp_path / "plain.csv").write_text(f"path,label\n{s.train[0].path},red\n")
    with pytest.raises(DataError, match="rows without a split"):
        read_splits(tmp_path / "plain.csv")


def test_odd_file_names_are_decoded_logged_and_listed(tmp_path: Path, caplog) -> None:
    root = _with_odd_names(tmp_path / "data")
    broken = root / "train" / "green" / os.fsdecode(b"br\xefken.png")
    broken.write_bytes(b"not an image")
    s = discover(root)
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file, encoding="utf-8")  # strict, as a run's log is
    logging.getLogger("resfit").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="resfit"):
            decoded = decode_all(s.train + s.val, 16, progress=False)
    finally:
        logging.getLogger("resfit").removeHandler(handler)
        handler.close()
    assert root / "train" / "red" / ODD in decoded.paths
    assert [p for p, _ in decoded.skipped] == [str(broken)]
    assert "br\\xefken.png" in log_file.read_text(encoding="utf-8")
    write_skipped(tmp_path / "skipped.csv", decoded.skipped)
    with open_csv(tmp_path / "skipped.csv") as f:
        assert Path(next(iter(csv.DictReader(f)))["path"]) == broken


def test_display_path_shows_undecodable_bytes_as_escapes() -> None:
    assert display_path(Path("/data") / ODD) == "/data/caf\\xe9.png"
    assert display_path("/data/café.png") == "/data/café.png"  # real UTF-8 is untouched
    assert display_text("x\ud800y") == "x\\ud800y"  # a surrogate no file name makes
    display_path(ODD).encode("utf-8")  # always encodable


def test_cli_train_on_odd_file_names_keeps_the_run_and_its_outputs(tmp_path: Path) -> None:
    """Issue 13, defect 1: ``resfit train`` trained, then lost the run at the end on
    ``'utf-8' codec can't encode character '\\udce9'``.

    Wiring this test relies on, outside data.py and report.py: training writes
    ``RUN/splits.csv`` with :func:`write_splits`, its ``train.log`` handler escapes what
    UTF-8 cannot hold, and ``eval-test/`` (evaluation.write_eval) writes CSVs with
    :func:`open_csv`.
    """
    root = make_colour_folder(tmp_path / "data", per_class=4, splits=("train", "val", "test"))
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        colour_image(COLOURS["red"], np.random.default_rng(seed)).save(root / split / "red" / ODD)
    broken = root / "train" / "green" / os.fsdecode(b"br\xefken.png")
    broken.write_bytes(b"not an image")
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "resfit", "train", str(root), "--out", str(run),
         "--arch", "resnet20_cifar", "--img-size", "16", "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Logging error" not in r.stderr

    report = (run / "report.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "br\\xefken.png" in report  # the skipped file, shown readably
    with open_csv(run / "skipped.csv") as f:
        assert [Path(row["path"]) for row in csv.DictReader(f)] == [broken]
    assert "br\\xefken.png" in (run / "train.log").read_text(encoding="utf-8")

    # The lead's wiring: RUN/splits.csv from write_splits, the same files in the same splits.
    back = read_splits(run / "splits.csv")
    for split in ("train", "val", "test"):
        assert root / split / "red" / ODD in [x.path for x in getattr(back, split)]
    # Every file found is listed, the one that did not decode too (skipped.csv says why).
    assert broken in [x.path for x in back.train]
    assert (len(back.train), len(back.val), len(back.test)) == (14, 13, 13)

    # evaluation.write_eval on the test split: every test image has its row, odd name included.
    with open_csv(run / "eval-test" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and str(root / "test" / "red" / ODD) in {row["path"] for row in rows}

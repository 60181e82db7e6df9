"""resfit prepare: shards with an index (labels, counts, hashes), resumable, and training from them."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("litdata")

from resfit.core.errors import ConfigError, DataError, ResfitError  # noqa: E402
from resfit.data.discovery import discover  # noqa: E402
from resfit.data.fingerprints import hash_image  # noqa: E402
from resfit.data.samples import SHARD_INDEX  # noqa: E402
from resfit.data.shards import ShardImages, prepare, read_splits  # noqa: E402
from resfit.data.sources import Sharding, choose_mode, get_source  # noqa: E402

from .images import make_colour_folder, write_broken_files  # noqa: E402

# Small JPEGs at the base size of 32 px training (shorter side 32): stored as they are, so the
# shards hold the very bytes a folder run decodes.
ARGS = dict(arch="resnet20_cifar", img_size=32, batch_size=16, epochs=2, augment="none",
            progress=False, report=False, seed=3, lr=0.05, precision="fp32", device="cpu")  # fmt: skip


def _jpeg_folder(root: Path, per_class: int = 12) -> Path:
    from PIL import Image

    make_colour_folder(root / "png", per_class=per_class, size=32)
    for png in sorted((root / "png").rglob("*.png")):
        dest = root / "data" / png.relative_to(root / "png").with_suffix(".jpg")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").resize((40, 32)).save(dest, quality=95)
    return root / "data"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _jpeg_folder(tmp_path_factory.mktemp("prep"))


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    prepare(folder, out, img_size=32, workers=2, progress=False)
    return out


def test_the_index_holds_labels_counts_hashes_and_the_skipped_files(folder, tmp_path) -> None:
    import shutil

    shutil.copytree(folder, tmp_path / "data")
    folder = tmp_path / "data"
    write_broken_files(folder / "train" / "red")
    shards = tmp_path / "s"
    prepare(folder, shards, img_size=32, workers=2, progress=False)
    index = json.loads((shards / SHARD_INDEX).read_text())
    assert index["classes"] == ["blue", "green", "red"] and index["base_size"] == 32
    assert index["splits"]["val"]["class_counts"] == {"blue": 12, "green": 12, "red": 12}
    assert index["splits"]["train"]["count"] == 36
    skipped = {Path(p).name for p, _ in index["skipped"]}
    assert {"empty.jpg", "truncated.jpg", "notes.png", "bomb.png"} <= skipped
    assert (shards / "skipped.csv").read_text().count("\n") == len(index["skipped"]) + 1
    splits = discover(folder)
    want = {str(s.path): s.label for s in splits.val}
    for s in index["splits"]["val"]["samples"]:
        assert want[s["path"]] == s["label"]
        h = hash_image(s["path"])
        assert s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest() == h.sha256
        assert int(s["phash"], 16) == h.phash
    read = read_splits(shards)
    assert read.counts()["train"] == {"blue": 12, "green": 12, "red": 12}  # without the broken
    assert len(read.fingerprints) == 72


def test_shard_pixels_are_the_folder_pixels(folder, shards) -> None:
    from resfit.data.decode import load_image, resize_shorter, to_tensor

    val = read_splits(shards).val
    images = ShardImages(shards, "val", [s.index for s in val], 32)
    for k in (0, 5, len(val) - 1):
        want = to_tensor(resize_shorter(load_image(val[k].path, 64), 32))
        assert torch.equal(images[k], want)


def test_multilabel_manifest_keeps_its_labels(folder, tmp_path) -> None:
    files = sorted((folder / "val").rglob("*.jpg"))[:12]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "split"])
        for i, p in enumerate(files):
            w.writerow([str(p), "a;b" if i % 3 == 0 else ("a" if i % 3 == 1 else "b"),
                        "val" if i >= 9 else "train"])  # fmt: skip
    prepare(tmp_path / "m.csv", tmp_path / "s", img_size=32, workers=1, progress=False)
    index = json.loads((tmp_path / "s" / SHARD_INDEX).read_text())
    assert index["task"] == "multilabel" and index["classes"] == ["a", "b"]
    assert index["splits"]["train"]["class_counts"] == {"a": 6, "b": 6}
    read = read_splits(tmp_path / "s")
    assert read.task == "multilabel" and read.train[0].label == (1, 1)


_SLOW = """
import sys, time
import resfit.data.shards as shards
shards.CHUNK_BYTES = 3000  # a chunk (and a checkpoint) every few images
if sys.argv[3] == "slow":
    encode = shards._Encoder.encode
    shards._Encoder.encode = lambda self, p, d: (time.sleep(0.15), encode(self, p, d))[1]
shards.prepare(sys.argv[1], sys.argv[2], img_size=32, workers=1, progress=False)
"""


def _prepare_in_process(data: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.Popen([sys.executable, "-c", _SLOW, str(data), str(out), mode], env=env,
                            start_new_session=True, stderr=subprocess.PIPE)  # fmt: skip


def _stored(out: Path) -> dict:
    from litdata import StreamingDataset

    index = json.loads((out / SHARD_INDEX).read_text())
    rows = {}
    for split, part in index["splits"].items():
        if part["samples"]:
            ds = StreamingDataset(str(out / split))
            rows[split] = [bytes(ds[i]["jpg"]) for i in range(len(ds))]
    return {"index": index, "rows": rows}


def test_a_killed_prepare_continues_and_equals_an_uninterrupted_one(folder, tmp_path) -> None:
    whole = _prepare_in_process(folder, tmp_path / "whole", "fast")
    assert whole.wait(120) == 0, whole.stderr.read().decode()[-2000:]
    killed = _prepare_in_process(folder, tmp_path / "resumed", "slow")
    checkpoints = tmp_path / "resumed" / "train" / ".checkpoints"
    deadline = time.time() + 60
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed" / SHARD_INDEX).exists()  # it did not finish
    again = _prepare_in_process(folder, tmp_path / "resumed", "fast")
    assert again.wait(120) == 0, again.stderr.read().decode()[-2000:]
    assert _stored(tmp_path / "resumed") == _stored(tmp_path / "whole")


def test_a_folder_that_is_not_prepared_is_a_clear_error(tmp_path, shards) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / SHARD_INDEX).write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        read_splits(tmp_path / "x")
    (tmp_path / "x" / SHARD_INDEX).write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a resfit shard index"):
        read_splits(tmp_path / "x")
    with pytest.raises(DataError, match="holds prepared shards"):
        discover(shards)  # eval, lr-find, audit: the original images
    with pytest.raises(ConfigError, match="prepared shards stream"):
        choose_mode("memory", [], [], (32, 32), shards=True)
    with pytest.raises(ResfitError, match="resfit prepare"):
        choose_mode("shards", [], [], (32, 32))


def test_two_ranks_read_disjoint_samples(shards) -> None:
    train = read_splits(shards).train
    seen = []
    for rank in (0, 1):
        plan = Sharding.plan(len(train), 16, rank, 2, seed=3)
        opened = get_source("shards").open([train[i] for i in plan.ids], 32, progress=False,
                                           desc="")  # fmt: skip
        seen.append(set(opened.images.indices))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(train)


def test_training_from_shards_equals_training_from_the_folder(folder, shards, tmp_path) -> None:
    from resfit.training import train

    a = train(data=str(shards), out=str(tmp_path / "a"), **ARGS)
    b = train(data=str(folder), out=str(tmp_path / "b"), data_mode="stream", **ARGS)
    assert a.config.data.data_mode == "shards"
    wa, wb = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=k)
    assert [r["val_loss"] for r in a.history] == pytest.approx([r["val_loss"] for r in b.history])


def test_the_cli_prepares_and_refuses_a_used_folder(folder, tmp_path, capsys) -> None:
    from resfit.cli import main

    args = ["prepare", str(folder), "--out", str(tmp_path / "s"), "--img-size", "32",
            "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "prepared train 36, val 36 images" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    assert main([*args[:3], str(tmp_path / "other"), *args[4:]]) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,named", [("data_format", ["int", "pickle"], "format pickle"),
                                             ("item_loader", "TokensLoader", "TokensLoader")])  # fmt: skip
def test_a_shard_folder_whose_chunks_name_another_format_is_refused_before_decoding(
    shards, tmp_path, key, value, named
) -> None:
    """Issue 26: LitData decodes with the format a chunk's index.json names, pickle included."""
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    index = copy / "val" / "index.json"
    doc = json.loads(index.read_text())
    doc["config"][key] = value
    index.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"val/index.json names .*{named}"):
        read_splits(copy)
    with pytest.raises(DataError, match="pickle can run code"):
        ShardImages(copy, "val", [0], 32)[0]  # the reader checks too, before LitData opens it

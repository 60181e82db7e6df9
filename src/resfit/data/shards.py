"""Prepared shards: ``resfit prepare DATA --out SHARDS`` and reading them back.

``prepare`` reads the images of DATA once (a folder layout or CSV manifest, as ``resfit
train`` finds them), keeps its splits, and writes each split as LitData chunks
(``SHARDS/train/``, ``SHARDS/val/``, ``SHARDS/test/``: ``index.json`` and ``chunk-*.bin``).
Sample i of a split is its i-th image: JPEG bytes with the shorter side at the run's base size
(256 px for 224 px training, as memory mode decodes), re-encoded at ``quality``. A JPEG that
is already at that size, upright and RGB is stored as it is (no second loss).

``SHARDS/resfit-shards.json`` (:data:`resfit.data.samples.SHARD_INDEX`) holds what training needs
before it reads a pixel: the classes, each sample's original path and label (a class index,
or for multi-label data the indices of its classes), class counts per split, the sha256 of
the original file and its perceptual hash (the leakage check's two fingerprints), and the
files that could not be read (also in ``SHARDS/skipped.csv``). So the class summary, the
imbalance warning and the leakage check need no decoding pass.

Why LitData (bench/shards.py): random access by index (resfit deals sample indices to batch
slots, which keeps a 2-rank run equal to a 1-rank run; WebDataset 1.x iterates only), a
parallel writer that resumes a killed run (``optimize(use_checkpoint=True)``), s3/gs/azure
readers, and no pins on numpy (mosaicml-streaming's would downgrade it).

Resuming: the plan (every split's files, labels and the options) is written first; run again,
``prepare`` checks that the plan is the same, skips the splits that are done and lets LitData
continue a split from its last checkpoint. The fingerprints go to one small JSON-lines file
per worker process; a sample done twice across a restart writes the same line twice.

Windows: DICOM and 16-bit images are stored through ``prepare``'s ``window`` (the ``--window``
text, recorded in the index as ``window``) as 16-bit PNGs, read back as float images in
[0, 1]: the windowed values reach the model at 16-bit precision, not through an 8-bit JPEG. A
run on a prepared folder takes the recorded window as its own (:func:`shard_window`); asking
for another one is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.atomic import atomic_write_text
from ..core.errors import ConfigError, DataError, MissingExtraError
from ..core.labels import CODINGS
from ..core.windows import parse_window, window_value
from .decode import displayable, load_image, resize_shorter
from .dicom import is_dicom
from .discovery import discover
from .paths import display_path, write_skipped
from .samples import SHARD_INDEX, SPLITS, DataSplits, Sample

log = logging.getLogger("resfit")

FORMAT = "resfit-shards"
VERSION = 1
CHUNK_BYTES = "64MB"
_WORK = ".prepare"  # the plan and the per-worker fingerprints, kept until the index is written


def _litdata() -> Any:
    try:
        import litdata
    except ImportError:
        raise MissingExtraError(
            "prepared shards are LitData chunks: pip install 'resfit[shards]'"
        ) from None
    return litdata


@dataclass
class ShardSample(Sample):
    """A sample of a prepared shard folder: ``path`` is where the image came from (for logs,
    splits.csv and the report), the pixels are image ``index`` of the ``split`` chunks."""

    split: str = "train"
    index: int = 0
    root: Path = Path()  # the prepared folder


def is_prepared(path: str | os.PathLike[str]) -> bool:
    return (Path(path).expanduser() / SHARD_INDEX).is_file()


# ---------------------------------------------------------------------------------------------
# Writing


class _Encoder:
    """LitData's ``fn``: one (position, path) -> the stored item; fingerprints on the side."""

    def __init__(self, base_size: int, quality: int, meta_dir: Path, split: str,
                 window: str | None = None) -> None:  # fmt: skip
        self.base_size, self.quality, self.meta_dir, self.split = (
            base_size,
            quality,
            meta_dir,
            split,
        )
        self.window = parse_window(window)

    def __call__(self, item: tuple[int, str]) -> dict[str, Any]:
        pos, path = item
        meta: dict[str, Any] = {"i": pos}
        jpg = b""
        try:
            data = Path(path).read_bytes()
            meta["sha256"] = hashlib.sha256(data).hexdigest()
            jpg = self.encode(path, data)
            meta["phash"] = _phash(data)
        except Exception as e:  # PIL raises many types for broken files: list it, go on
            jpg = b""
            meta["problem"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        # One line per sample, appended and flushed at once: a killed worker leaves whole lines.
        with open(self.meta_dir / f"meta-{self.split}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(meta) + "\n")
        return {"id": pos, "jpg": jpg}

    def encode(self, path: str, data: bytes) -> bytes:
        as_is = False
        if not is_dicom(Path(path), data):  # PIL cannot open a DICOM file: it is decoded below
            with Image.open(io.BytesIO(data)) as probe:
                as_is = (probe.format == "JPEG" and probe.mode == "RGB"
                         and min(probe.size) == self.base_size
                         and probe.getexif().get(0x0112, 1) == 1)  # fmt: skip
        img = load_image(path, max_side=self.base_size * 2, data=data, window=self.window)
        if as_is:  # decoded all the same: a file that does not decode is listed, not stored
            return data
        buf = io.BytesIO()
        img = resize_shorter(img, self.base_size)
        if img.mode == "F":  # windowed: 16 bits (a PNG) keep what 8 would round away
            values = np.asarray(img, dtype=np.float32)
            Image.fromarray(np.round(np.clip(values, 0, 1) * 65535).astype(np.uint16)).save(
                buf, "PNG"
            )
            return buf.getvalue()
        displayable(img).save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()


def _phash(data: bytes) -> str | None:
    from .fingerprints import fingerprint

    ph = fingerprint(data)
    return None if ph is None else f"{ph:016x}"


def _plan(splits: DataSplits, base_size: int, quality: int, window: str | None) -> dict[str, Any]:
    def label(s: Sample) -> Any:
        return [i for i, on in enumerate(s.label) if on] if isinstance(s.label, tuple) else s.label

    return {
        "format": FORMAT, "version": VERSION, "base_size": base_size, "quality": quality,
        "window": window,
        "classes": splits.classes, "task": splits.task, "source": splits.source,
        "origins": splits.origins, "skipped": [list(x) for x in splits.skipped],
        "splits": {s: [[str(x.path), label(x)] for x in getattr(splits, s)] for s in SPLITS},
    }  # fmt: skip


def prepare(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    img_size: int = 224,
    workers: int | None = None,
    quality: int = 93,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    seed: int = 0,
    task: str = "auto",
    progress: bool = True,
    group_by: str | None = None,
    window: str | None = None,
) -> dict[str, Any]:
    """Write the shards of ``data`` into ``out`` (see the module doc) and return the index.
    Run again on the same ``out``, it continues where a killed run stopped. ``window`` (the
    ``--window`` text): DICOM and 16-bit images are stored through it, and the index records
    it (:func:`shard_window`)."""
    from .preprocessing import base_size_for

    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, not {quality}")
    out = Path(out).expanduser()
    if is_prepared(out):
        log.info("%s is already prepared", display_path(out))
        return json.loads((out / SHARD_INDEX).read_text())
    splits = discover(data, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                      task=task, group_by=group_by)  # fmt: skip
    window = window_value(window) if window else None  # checked, as the CLI keeps it
    plan = _plan(splits, base_size_for(img_size), quality, window)
    work = out / _WORK
    workers = _start_or_resume(out, work, plan, workers or max(1, os.cpu_count() or 1))
    for split in SPLITS:
        # Lists, not tuples: LitData compares them with its checkpoint's JSON copy on resume.
        items = [[i, p] for i, (p, _) in enumerate(plan["splits"][split])]
        if items and not (out / split / "index.json").is_file():
            log.info("prepare: %s, %d images", split, len(items))
            _write_split(out / split, items, _Encoder(plan["base_size"], quality, work, split, window),
                         workers, progress)  # fmt: skip
    index = _index(plan, work)
    write_skipped(out / "skipped.csv", [tuple(x) for x in index["skipped"]])
    atomic_write_text(out / SHARD_INDEX, json.dumps(index))  # last: its presence means done
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return index


def _start_or_resume(out: Path, work: Path, plan: dict[str, Any], workers: int) -> int:
    """Start (the plan written first) or continue a prepare; the number of writer processes
    (a continued run keeps its own: LitData's checkpoints are per worker)."""
    plan_file = work / "plan.json"
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if {k: v for k, v in saved.items() if k != "workers"} != plan:
            raise DataError(
                f"{display_path(out)} holds an unfinished prepare of other data or options: "
                f"give the same DATA and options to continue it, or another --out"
            )
        log.info("prepare: continuing the unfinished run in %s with its %d writer(s)",
                 display_path(out), saved["workers"])  # fmt: skip
        return int(saved["workers"])
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{display_path(out)} is not empty: give a new folder as --out")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan_file, json.dumps({**plan, "workers": workers}))
    return workers


def _write_split(dest: Path, items: list, encoder: _Encoder, workers: int, progress: bool) -> None:
    litdata = _litdata()
    method = multiprocessing.get_start_method(allow_none=True)
    try:  # optimize() sets the start method for the whole process: put it back afterwards
        litdata.optimize(encoder, items, str(dest), chunk_bytes=CHUNK_BYTES,
                         num_workers=min(workers, len(items)), use_checkpoint=True,
                         keep_data_ordered=True, start_method="fork", verbose=progress)  # fmt: skip
    finally:
        multiprocessing.set_start_method(method, force=True)


def _index(plan: dict[str, Any], work: Path) -> dict[str, Any]:
    """The index: the plan's samples with their fingerprints, counts and skipped files."""
    index = {k: v for k, v in plan.items() if k != "splits"}
    skipped = [tuple(x) for x in plan["skipped"]]
    index["splits"] = {}
    for split in SPLITS:
        rows = plan["splits"][split]
        meta: dict[int, dict] = {}
        for f in sorted(work.glob(f"meta-{split}-*.jsonl")):
            for line in f.read_text().splitlines():
                if line.strip():
                    m = json.loads(line)
                    meta[m["i"]] = m
        missing = [i for i in range(len(rows)) if i not in meta]
        if missing:
            raise DataError(f"prepare: {len(missing)} {split} image(s) have no record; run again")
        samples = []
        for i, (path, label) in enumerate(rows):
            m = meta[i]
            sample = {"path": path, "label": label, "sha256": m.get("sha256"),
                      "phash": m.get("phash")}  # fmt: skip
            if "problem" in m:
                sample["skipped"] = m["problem"]
                skipped.append((path, m["problem"]))
            samples.append(sample)
        index["splits"][split] = {"count": sum("skipped" not in s for s in samples),
                                  "class_counts": _class_counts(samples, plan["classes"]),
                                  "samples": samples}  # fmt: skip
    index["skipped"] = [list(x) for x in skipped]
    return index


def _class_counts(samples: list[dict], classes: list[str]) -> dict[str, int]:
    c: Counter = Counter()
    for s in samples:
        if "skipped" not in s:
            c.update(s["label"] if isinstance(s["label"], list) else [s["label"]])
    return {name: c.get(i, 0) for i, name in enumerate(classes)}


# ---------------------------------------------------------------------------------------------
# Reading


def read_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a prepared folder; a :class:`DataError` if it is not one resfit can read."""
    root = Path(path).expanduser()
    file = root / SHARD_INDEX
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        what = "an unfinished prepare" if (root / _WORK).is_dir() else "not a prepared folder"
        raise DataError(
            f"{display_path(root)} is {what} (no {SHARD_INDEX}): run resfit prepare DATA "
            f"--out {display_path(root)}"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(
            f"{display_path(file)} cannot be read ({e}): run resfit prepare again"
        ) from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(
            f"{display_path(file)} is not a resfit shard index of version {VERSION}: prepare "
            f"the data again with this resfit"
        )
    for split, part in index["splits"].items():
        if part["samples"] and not (root / split / "index.json").is_file():
            raise DataError(
                f"{display_path(root / split)} has no index.json: the shards are incomplete; "
                f"run resfit prepare again into a new folder"
            )
        if part["samples"]:
            check_chunk_format(root / split)
    return index


def _as_list(label: int | list[int]) -> list[int]:
    return label if isinstance(label, list) else [label]


# What resfit's chunks hold ({"id": int, "jpg": bytes}). LitData decodes each chunk with the
# serializers its index.json names, pickle included: a folder from elsewhere could run code.
_CHUNK_FORMATS = {"int", "bytes"}
_CHUNK_LOADERS = {"PyTreeLoader"}


def check_chunk_format(folder: Path) -> None:
    """A :class:`DataError` unless the chunks of ``folder`` are stored the way resfit writes
    them; checked before LitData reads (decodes) anything from them."""
    file = folder / "index.json"
    try:
        config = json.loads(file.read_text())["config"]
        formats = config["data_format"]
        formats = [formats] if isinstance(formats, str) else list(formats)
        bad = [f for f in formats if f not in _CHUNK_FORMATS]
        loader, encryption = config.get("item_loader"), config.get("encryption")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{display_path(file)} cannot be read ({e}): prepare the data again"
        ) from None
    if bad or loader not in _CHUNK_LOADERS or encryption is not None:
        what = (f"data format {', '.join(map(str, bad))}" if bad
                else f"item loader {loader}" if loader not in _CHUNK_LOADERS else "encryption")  # fmt: skip
        raise DataError(
            f"{display_path(file)} names {what}: resfit reads only the chunks it writes "
            f"({' and '.join(sorted(_CHUNK_FORMATS))} data), and never decodes other formats "
            "(pickle can run code). Prepare the data with resfit prepare"
        )


def shard_window(path: str | os.PathLike[str], asked: str | None) -> str | None:
    """The window a prepared folder's images were stored through (its index's ``window``),
    which a run on it records as its own, so that predict and serve decode the original DICOM
    files as the run saw them. The pixels are windowed already: asking for another window is a
    :class:`ConfigError` that says which one they have, not a silent double windowing."""
    root = Path(path).expanduser()
    recorded = read_index(root).get("window") or None
    if asked and parse_window(asked) != parse_window(recorded):
        have = f"--window {recorded}" if recorded else "no --window (each file's own)"
        raise ConfigError(
            f"{display_path(root)} was prepared with {have}: its images are stored windowed, "
            f"so --window {asked} cannot apply. Train without --window (the run takes the "
            f"prepared one), or run resfit prepare again with --window {asked}"
        )
    return recorded


def read_splits(path: str | os.PathLike[str], task: str = "auto") -> DataSplits:
    """The splits of a prepared folder, as :func:`resfit.data.discovery.discover` gives them for the
    original data, with each sample's fingerprints in ``DataSplits.fingerprints``."""
    from .manifests import as_task

    root = Path(path).expanduser()
    index = read_index(root)
    classes, coding = index["classes"], CODINGS.get(index["task"])
    found: dict[str, list[Sample]] = {}
    fingerprints: dict[str, tuple[str, int | None]] = {}
    for split in SPLITS:
        found[split] = []
        for i, s in enumerate(index["splits"][split]["samples"]):
            if "skipped" in s:
                continue
            # The index holds a class index, or the list of a multi-hot label's classes.
            label = coding.from_classes(_as_list(s["label"]), len(classes))
            found[split].append(
                ShardSample(Path(s["path"]), label, split=split, index=i, root=root)
            )
            ph = s.get("phash")
            fingerprints[s["path"]] = (s["sha256"], None if ph is None else int(ph, 16))
    origins = {s: f"{o} (prepared in {display_path(root)})" for s, o in index["origins"].items()}
    splits = DataSplits(classes, found["train"], found["val"], found["test"],
                        skipped=[tuple(x) for x in index["skipped"]], source=str(root),
                        origins=origins, task=index["task"], fingerprints=fingerprints)  # fmt: skip
    for split in SPLITS:
        log.info("data: %s <- %s", split, splits.origins.get(split, "none"))
    return as_task(splits, task)


class ShardImages(Sequence):
    """Images of one split's chunks, decoded (and resized to ``base_size``) when indexed.
    Each process opens the chunks itself (DataLoader workers fork after ``open``)."""

    def __init__(self, root: Path, split: str, indices: Sequence[int], base_size: int) -> None:
        self.root, self.split, self.indices = root, split, list(indices)
        self.base_size = base_size
        self._open: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _dataset(self) -> Any:
        if self._open is None or self._open[0] != os.getpid():
            check_chunk_format(self.root / self.split)  # before LitData decodes a chunk
            ds = _litdata().StreamingDataset(str(self.root / self.split))
            self._open = (os.getpid(), ds)
        return self._open[1]

    def __getitem__(self, i):  # type: ignore[override]
        from .decode import to_tensor

        if isinstance(i, slice):
            return ShardImages(self.root, self.split, self.indices[i], self.base_size)
        k = self.indices[i]
        row = self._dataset()[k]
        if int(row["id"]) != k:
            raise DataError(f"{display_path(self.root / self.split)}: image {k} is stored as "
                            f"{int(row['id'])}; the shards are damaged, prepare them again")  # fmt: skip
        data = bytes(row["jpg"])
        img = _windowed(data) or load_image(f"{self.split}#{k}", max_side=self.base_size * 2,
                                            data=data)  # fmt: skip
        return to_tensor(resize_shorter(img, self.base_size))


def _windowed(data: bytes) -> Image.Image | None:
    """A windowed image as stored (a 16-bit PNG), back to a float ``F`` image in [0, 1]; None
    for anything else (a photo's JPEG)."""
    if not data.startswith(b"\x89PNG"):
        return None
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("I;16", "I;16L", "I;16B"):
            return None
        return Image.fromarray(np.asarray(img, dtype=np.float32) / 65535)


__all__ = [
    "ShardImages",
    "ShardSample",
    "check_chunk_format",
    "is_prepared",
    "prepare",
    "read_index",
    "read_splits",
    "shard_window",
]

"""Data: find labelled images, split them, decode them robustly, and hold them ready for training.

Layouts understood by :func:`discover`:
- ``DATA/train/<class>/*`` with optional ``DATA/val/<class>/*`` and ``DATA/test/<class>/*``
  (a missing val split is carved out of train, stratified by the seed);
- ``DATA/<class>/*``: one folder of class folders, split into train/val/test by the seed;
- a CSV manifest ``path,label[,split]`` (paths relative to the CSV's folder).

Decoding converts every image to 8-bit RGB the way a person sees it: EXIF orientation applied,
grey/palette/CMYK converted, 16-bit scaled (not clipped), transparency composited on white,
the first frame of a GIF. Files that cannot be decoded are skipped and listed, never a crash.

Knows nothing of models or training.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

log = logging.getLogger("resfit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# PIL's own decompression-bomb limit; a larger image is refused before it is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class DataError(ValueError):
    """The data cannot be used as given; the message names the path and what to do."""


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class DataSplits:
    """What :func:`discover` found: the splits, the class names and the files it ignored."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split in ("train", "val", "test"):
            c = Counter(s.label for s in getattr(self, split))
            out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out


# ---------------------------------------------------------------------------------------------
# Finding files


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Map class name -> image files for a folder of class folders; empty classes dropped."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _list_images(d)
        if files:
            found[d.name] = files
        else:
            log.warning("ignoring empty class folder %s (no images in it)", d)
    return found


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
            f"the {split} split has classes that training does not: {', '.join(unknown)}. "
            f"Add training images for them or remove them from {split}."
        )
    return [Sample(p, index[c]) for c, files in by_class.items() for p in files]


def discover(
    data: str | os.PathLike,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> DataSplits:
    """Find the labelled images under ``data`` (see the module doc for the layouts)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root} is a file but not a CSV manifest (path,label[,split])")
        return _discover_csv(root, val_fraction, test_fraction, seed)

    if (root / "train").is_dir():
        train = scan_class_folders(root / "train")
        _check_classes(train, root / "train")
        classes = sorted(train)
        val = scan_class_folders(root / "val") if (root / "val").is_dir() else None
        test = scan_class_folders(root / "test") if (root / "test").is_dir() else {}
        if val is None:
            train, val = _stratified_split(train, [val_fraction], seed)
        return DataSplits(
            classes,
            _to_samples(train, classes, "train"),
            _to_samples(val, classes, "val"),
            _to_samples(test, classes, "test"),
            source=str(root),
        )

    by_class = scan_class_folders(root)
    _check_classes(by_class, root)
    classes = sorted(by_class)
    fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 else [])
    parts = _stratified_split(by_class, fractions, seed)
    return DataSplits(
        classes,
        _to_samples(parts[0], classes, "train"),
        _to_samples(parts[1], classes, "val"),
        _to_samples(parts[2], classes, "test") if test_fraction > 0 else [],
        source=str(root),
    )


def _check_classes(by_class: dict[str, list[Path]], root: Path) -> None:
    if not by_class:
        raise DataError(
            f"no class folders with images under {root}: expected {root}/<class>/<image> "
            f"(or {root}/train/<class>/<image>), images ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    if len(by_class) == 1:
        raise DataError(
            f"{root} has a single class ({next(iter(by_class))}): a classifier needs at least two "
            f"class folders"
        )


def _discover_csv(path: Path, val_fraction: float, test_fraction: float, seed: int) -> DataSplits:
    rows: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}, "": {}}
    skipped: list[tuple[str, str]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} needs a header with columns path,label (and optional split)")
        for line_no, row in enumerate(reader, start=2):
            p = Path(row["path"])
            p = p if p.is_absolute() else path.parent / p
            split = (row.get("split") or "").strip().lower()
            if split not in rows:
                raise DataError(
                    f"{path}:{line_no}: split must be train, val or test, not {split!r}"
                )
            if not p.is_file():
                skipped.append((str(p), f"listed in {path.name}:{line_no} but missing"))
                continue
            rows[split].setdefault(row["label"].strip(), []).append(p)
    unsplit = rows.pop("")
    for cls, files in unsplit.items():
        rows["train"].setdefault(cls, []).extend(files)
    _check_classes(rows["train"], path)
    classes = sorted(rows["train"])
    train, val, test = rows["train"], rows["val"], rows["test"]
    if not val:
        fractions = [val_fraction] + ([test_fraction] if test_fraction > 0 and not test else [])
        parts = _stratified_split(train, fractions, seed)
        train, val = parts[0], parts[1]
        if len(parts) > 2:
            test = parts[2]
    return DataSplits(
        classes,
        _to_samples(train, classes, "train"),
        _to_samples(val, classes, "val"),
        _to_samples(test, classes, "test"),
        skipped=skipped,
        source=str(path),
    )


def eval_samples(
    data: str | os.PathLike, classes: Sequence[str]
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The images to evaluate on: a folder of class folders, a data root whose ``test/``
    (else ``val/``) split is used, or a CSV manifest (its test rows, else all rows)."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    if root.is_file():
        splits = _discover_csv(root, 0.0, 0.0, 0)
        samples = splits.test or splits.train + splits.val
        names = splits.classes
        remap = {i: list(classes).index(n) for i, n in enumerate(names) if n in classes}
        missing = sorted(set(names) - set(classes))
        if missing:
            raise DataError(f"{root} has classes the model was not trained on: {missing}")
        return [Sample(s.path, remap[s.label]) for s in samples], splits.skipped
    for split in ("test", "val"):
        if (root / split).is_dir():
            root = root / split
            break
    by_class = scan_class_folders(root)
    if not by_class:
        raise DataError(f"no class folders with images under {root}")
    missing = sorted(set(by_class) - set(classes))
    if missing:
        raise DataError(
            f"{root} has classes the model was not trained on: {', '.join(missing)} "
            f"(it knows {', '.join(classes)})"
        )
    return _to_samples(by_class, list(classes), str(root)), []


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively) and glob patterns -> image files, in order."""
    import glob

    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(_list_images(p))
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching glob")
            for m in matches:
                mp = Path(m)
                out.extend(_list_images(mp) if mp.is_dir() else [mp])
    return out


# ---------------------------------------------------------------------------------------------
# Decoding


class DecodeError(Exception):
    pass


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        # 16-bit data: scale to 8 bits instead of letting convert() clip it to white.
        peak = 65535 if arr.max() > 255 else 255
        return Image.fromarray(
            (arr.astype(np.float64) * (255 / peak)).round().astype(np.uint8)
        ).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo or 1.0) * 255
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Decode one image to RGB as a person sees it. ``max_side`` lets JPEG decoding downscale
    in the DCT domain (PIL's draft mode), several times faster for large photos.

    Raises :class:`DecodeError` with a short reason for anything unreadable.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DecodeError("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DecodeError(
                        f"{img.width}x{img.height} pixels exceeds the {MAX_PIXELS:,} limit "
                        f"(decompression bomb guard)"
                    )
                if max_side and img.format == "JPEG":
                    img.draft("RGB", (max_side, max_side))
                img.seek(0)  # first frame of an animation
                img = ImageOps.exif_transpose(img)
                img.load()
                return _pil_to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb guard: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DecodeError(reason) from None


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class DecodedImages:
    """Images decoded once, shorter side resized to ``base_size``, as uint8 (3, H, W) tensors."""

    images: list[Tensor]
    labels: Tensor
    paths: list[Path]
    skipped: list[tuple[str, str]]
    base_size: int

    def __len__(self) -> int:
        return len(self.images)


def decode_all(
    samples: Sequence[Sample],
    base_size: int,
    *,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decoding",
) -> DecodedImages:
    """Decode every sample once (in threads: PIL releases the GIL while decoding).

    Done up front so that broken files are known and listed before training starts, and so
    that no epoch pays for JPEG decoding again: on a 2-core machine decoding otherwise costs as
    much as the forward pass of a small network.
    """
    from tqdm.auto import tqdm

    def work(s: Sample) -> Tensor | str:
        try:
            img = load_image(s.path, max_side=base_size * 2)
            return to_tensor(resize_shorter(img, base_size))
        except DecodeError as e:
            return str(e)

    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    images, labels, paths, skipped = [], [], [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(work, samples, chunksize=16)
        for s, r in tqdm(
            zip(samples, results, strict=True),
            total=len(samples),
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            if isinstance(r, str):
                skipped.append((str(s.path), r))
                log.warning("skipping %s: %s", s.path, r)
            else:
                images.append(r)
                labels.append(s.label)
                paths.append(s.path)
    return DecodedImages(images, torch.tensor(labels, dtype=torch.long), paths, skipped, base_size)


class TransformedImages(torch.utils.data.Dataset):
    """Decoded images with a per-sample transform (uint8 tensor -> float tensor)."""

    def __init__(self, decoded: DecodedImages, transform: Callable[[Tensor], Tensor]) -> None:
        self.decoded = decoded
        self.transform = transform

    def __len__(self) -> int:
        return len(self.decoded)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.decoded.images[i]), self.decoded.labels[i]


def iter_batches(
    dataset: torch.utils.data.Dataset, index_batches: Sequence[Sequence[int]], workers: int = 0
):
    """Yield stacked ``(x, y)`` batches for the given index lists. With ``workers`` > 0 the
    per-image transforms run in that many processes (overlapping the model); with 0 they run
    here on one thread: a 32 px random affine takes 0.33 ms on one thread and 2.5 ms on
    two here, since such small ops cost more to split than to run."""
    if workers > 0:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[list(map(int, b)) for b in index_batches], num_workers=workers
        )
        yield from loader
        return
    for idx in index_batches:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            items = [dataset[int(i)] for i in idx]
        finally:
            torch.set_num_threads(before)
        yield (
            torch.stack([it[0] for it in items]),
            torch.stack([torch.as_tensor(it[1]) for it in items]),
        )


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)

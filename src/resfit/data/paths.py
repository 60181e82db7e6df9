"""Paths as text, and finding images.

File names are bytes on Linux; one that is not UTF-8 (``caf\\xe9.png`` from an old camera or a
Windows zip) reaches Python as a string with lone surrogates (PEP 383), which a strict UTF-8
writer refuses. :func:`open_csv` writes such names back as the same bytes (so a CSV of paths
can be read back and opened), :func:`display_path` shows them as ``\\xe9`` in logs and pages.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..core.atomic import atomic_csv
from ..core.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "display_path",
    "display_text",
    "find_images",
    "list_images",
    "open_csv",
    "write_skipped",
]

IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".gif",
    ".tif",
    ".tiff",
    ".dcm",
    ".dicom",
)


# ---------------------------------------------------------------------------------------------
# Paths as text


def display_text(text: str) -> str:
    """``text`` with any undecodable file-system bytes shown as ``\\xNN`` escapes.

    For what people read (logs, the HTML report, error messages): the result is valid UTF-8
    whatever the file name was, and unchanged for every name that already was.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as printable UTF-8 text (see :func:`display_text`); not for opening the file."""
    return display_text(os.fspath(path))


def open_csv(path: str | os.PathLike[str], mode: str = "r") -> TextIO:
    """Open a CSV that holds paths or class names, for ``csv.reader``/``csv.writer``.

    UTF-8 with ``surrogateescape``: a file name whose bytes are not UTF-8 is written as those
    same bytes and read back as the same ``str``, so the path opens again; a strict writer
    would lose the whole file at the first such name. Reading also accepts a byte-order mark
    (spreadsheets write one).
    """
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    return open(path, mode, newline="", encoding=encoding, errors="surrogateescape")


# ---------------------------------------------------------------------------------------------
# Finding files


def list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively) and glob patterns -> image files, in order."""
    import glob

    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(list_images(p))
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"{display_text(item)}: no such file, folder or matching glob")
            for m in matches:
                mp = Path(m)
                out.extend(list_images(mp) if mp.is_dir() else [mp])
    return out


def write_skipped(path: str | os.PathLike[str], skipped: Sequence[tuple[str, str]]) -> None:
    """Write ``path,reason`` for the files that were left out (odd names keep their bytes)."""
    with atomic_csv(path) as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)

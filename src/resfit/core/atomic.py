"""Atomic, durable writes: the one way resfit writes a file that must never be half there.

Every writer goes the same way: the bytes go to a temporary file in the target's folder
(``.NAME.tmp-<pid>-<start>``, see :func:`temp_path`), which is flushed and fsynced, renamed over the
target (``os.replace``), and then the folder itself is fsynced so the rename survives a power
cut. A crash, a full disk or an exception in the middle leaves the previous file in place and
no temporary file behind (a killed process may leave a ``.NAME.tmp-<pid>-<start>``,
recognisable by its name: the writer's pid and its start time, so that a pid reused by another
process does not pass for the writer).

- :func:`atomic_open`: a file object (``with atomic_open(path, "w", newline="") as f``)
- :func:`atomic_path`: a temporary path for libraries that write to a path themselves
  (``torch.save``, safetensors ``save_file``, ``onnx.save``, ``savefig`` with ``format=``)
- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json`
- :func:`atomic_save` (``torch.save``), :func:`atomic_save_safetensors`
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .procs import alive, start_time

if TYPE_CHECKING:
    from torch import Tensor

TMP_MARK = ".tmp-"  # a temporary file is ".NAME.tmp-<pid>-<start>"
_OWN_START: dict[int, str] = {}  # pid -> its start time (a forked child has another pid)


def _writer() -> str:
    """``<pid>-<start>`` of this process (``<pid>`` where there is no /proc): who wrote a
    temporary file, told apart from a later process that got the same pid."""
    pid = os.getpid()
    if pid not in _OWN_START:
        _OWN_START[pid] = start_time(pid)
    start = _OWN_START[pid]
    return str(pid) if start == "0" else f"{pid}-{start}"


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file a write of ``path`` goes through, in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{_writer()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened: Windows)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put a finished temporary file (written beside ``path`` by a writer that needs its own
    file: a memory map, a checked download) in place: fsync it, rename it, fsync the folder."""
    _fsync_file(Path(tmp))
    _commit(Path(tmp), Path(path))


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, previous: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library to write to; on success it is
    fsynced and renamed onto ``path``; on an exception it is removed and ``path`` untouched.
    With ``previous``, the file that ``path`` held is kept there (renamed, after the new one
    is safely on disk), so a reader can fall back to it if the new one is ever unreadable.
    The temporary name does not end in the target's suffix: give a writer that guesses the
    format from the name (``savefig``) the format explicitly."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode, **kwargs)`` that writes to a temporary file and puts it in place
    (flushed, fsynced, renamed, folder fsynced) only when the block ends without an exception."""
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_open writes a new file: mode {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` as the whole content of ``path``, atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, errors: str = "surrogateescape") -> None:
    """Text as UTF-8; by default characters that cannot be encoded (the undecodable bytes of
    an odd file name) are written back as the bytes they came from."""
    with atomic_open(path, "w", encoding="utf-8", errors=errors) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """``json.dumps(obj, **dumps)`` (``indent=2`` unless given), atomically."""
    dumps.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dumps))


def atomic_save(
    obj: object, path: str | os.PathLike, previous: str | os.PathLike | None = None
) -> None:
    """``torch.save`` atomically (``previous``: see :func:`atomic_path`)."""
    import torch

    with atomic_path(path, previous) as tmp:
        torch.save(obj, tmp)


def atomic_save_safetensors(
    state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """A state dict as safetensors (loadable without unpickling), atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata)


def atomic_csv(path: str | os.PathLike) -> contextlib.AbstractContextManager[IO[str]]:
    """A CSV opened for ``csv.writer`` as :func:`resfit.data.paths.open_csv` opens it (UTF-8,
    ``surrogateescape`` so odd file names keep their bytes, ``newline=""``), atomically."""
    return atomic_open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; on success its files are
    fsynced and it takes the place of ``path`` (an existing folder there is replaced, or with
    ``replace=False`` an ``OSError`` says another writer got there first); on an exception it
    is removed. A reader (Triton polling a repository, a cache lookup) never sees half a folder.
    """
    import shutil

    path = Path(path)
    tmp, old = temp_path(path), path.with_name(f".{path.name}.old-{_writer()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if replace and path.exists():
            os.replace(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# .NAME.tmp-<pid>[-<start>], atomic_dir's .old-<pid>[-<start>] (no start: an older resfit's)
_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:-(\d+))?$")


def _stale(entry: Path, pid: int, start: str | None = None) -> bool:
    """Whether the writer of a temporary file is gone: its pid is dead (or a zombie), or the
    pid now runs another process: one with another start time than the writer's ``start``
    (recorded in the name), or, for a name without it, one started after the file was last
    written."""
    if pid == os.getpid():
        return False  # this process may be writing it now
    now = start_time(pid)  # of whatever process holds the pid now ('0': none, or no /proc)
    if not alive(pid, now):  # dead, or a zombie
        return True
    if start is not None and now != "0":
        return now != start  # the writer's own start time against the pid's holder's
    started = _started_at(now)
    return started is not None and entry.lstat().st_mtime < started - 1.0


def _started_at(start: str) -> float | None:
    """A process start time (clock ticks since boot, from /proc) as a Unix time, or None."""
    try:
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return btime + int(start) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``folder`` (only
    resfit's own names, ``.NAME.tmp-<pid>-<start>`` and ``.NAME.old-<pid>-<start>``, and only those whose
    writer is gone: see :func:`_stale`). Returns what was removed."""
    import shutil

    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        try:
            if not m or not _stale(entry, int(m.group(1)), m.group(2)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove: leave it
        removed.append(entry)
    return removed

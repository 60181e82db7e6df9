"""Which process holds a pid: its start time and whether it still runs (Linux ``/proc``;
``os.kill(pid, 0)`` elsewhere). Torch-free, so that :mod:`resfit.core.atomic` can tell a
killed writer's temporary file from a live one's without importing :mod:`resfit.core.threads`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["alive", "start_time"]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the name (state first), [] where there is none."""
    try:
        return (
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        )  # name may hold spaces
    except (OSError, IndexError):
        return []


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('0' where /proc is not there): a pid
    reused by another program after a resfit process was killed has another start time."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else "0"  # field 22


def alive(pid: int, start: str) -> bool:
    """Whether ``pid`` still runs the process that started at ``start`` (see :func:`start_time`);
    a zombie (dead, not yet reaped by its parent) is not alive."""
    if start != "0" and Path("/proc").is_dir():
        fields = _stat(pid)
        return len(fields) > 19 and fields[19] == start and fields[0] != "Z"
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, run by another user
        return True
    return True

"""CPU threads: each resfit process takes its share of the cores, not all of them.

PyTorch starts one OpenMP thread per core in every process, and those threads spin while they
wait for each other. Two such processes on the same cores fight: on a 2-core machine a
ResNet-56 CIFAR train step ran 304 img/s alone, but 64 and 3.8 img/s with two processes side by
side (one job 80x slower, the pair a fifth of the work of one); with one thread each they ran
202 + 203. So resfit keeps a small registry of its live processes on the machine (one file per
pid under the temp folder) and :func:`configure` picks, in this order:

1. ``--threads N`` (the ``threads`` argument),
2. ``RESFIT_THREADS``,
3. ``OMP_NUM_THREADS``, when the user set it,
4. the fair share: ``available_cpus() // live resfit processes``, at least 1.

:func:`available_cpus` counts the CPUs this process may run on (affinity: taskset, Slurm,
cpusets) capped by the cgroup CPU quota (``docker --cpus``, Kubernetes limits), which
``os.cpu_count`` ignores. Long jobs call :func:`rebalance` between epochs, so a process that
started alone gives a core back when a second one starts, and takes it back when that one ends.
Worker processes get their share from :func:`child_threads` and :func:`child_env`; DataLoader
workers run :func:`worker_init` (one thread each).

``configure`` exports ``OMP_NUM_THREADS`` for child processes and marks it as its own, so that a
resfit process started by another one still takes its fair share instead of reading the
parent's count as the user's choice.

Imports only the standard library, torch and :mod:`resfit.core.errors`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import tempfile
import threading
from pathlib import Path

import torch

from .errors import ConfigError
from .procs import alive, start_time  # noqa: F401  (part of this module's interface)

log = logging.getLogger("resfit")

__all__ = [
    "CPUS_ENV",
    "PROC_DIR_ENV",
    "THREADS_ENV",
    "available_cpus",
    "cgroup_cpu_limit",
    "child_env",
    "child_threads",
    "configure",
    "live_processes",
    "oversubscription_warning",
    "rebalance",
    "registry_dir",
    "requested_threads",
    "worker_init",
]

THREADS_ENV = "RESFIT_THREADS"  # threads per resfit process, as --threads
CPUS_ENV = "RESFIT_CPUS"  # the CPUs resfit shares out, instead of affinity and quota
PROC_DIR_ENV = "RESFIT_PROC_DIR"  # the registry folder, instead of $TMP/resfit-<uid>/procs
LIBRARY_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Holds the OMP_NUM_THREADS value configure() exported, so a child can tell it from the user's.
_EXPORTED_ENV = "RESFIT_EXPORTED_THREADS"

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_FAIR_SHARE = "fair share"


@dataclasses.dataclass
class _State:
    """What configure() chose for this process."""

    threads: int
    reason: str
    explicit: bool  # from --threads or the environment: rebalance() leaves it alone
    cpus: int
    pid: int
    entry: Path | None  # this process's registry file; None when the registry is unusable


_state: _State | None = None
_interop_done = False
_atexit_done = False
_lock = threading.Lock()


# -- CPUs ---------------------------------------------------------------------------------------


def available_cpus() -> int:
    """The number of CPUs this process may use: its CPU affinity capped by the cgroup quota.

    ``RESFIT_CPUS`` overrides both (to leave cores to other programs, or in tests). The cgroup
    paths are the module constants ``CGROUP_ROOT`` and ``PROC_SELF_CGROUP``.
    """
    override = os.environ.get(CPUS_ENV, "").strip()
    if override:
        return _positive_int(override, CPUS_ENV)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(CGROUP_ROOT, PROC_SELF_CGROUP)
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """The cgroup CPU quota in whole CPUs (quota / period, rounded up, at least 1), or None.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in this
    process's cgroup (from ``proc_cgroup``) and in each folder above it up to ``root``, since a
    parent's quota binds its children too; the tightest one wins.
    """
    own = _own_cgroups(proc_cgroup)
    limits = [_read_v2(d / "cpu.max") for d in _walk_up(root, own.get("", "/"))]
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / mount).is_dir():
            limits += [_read_v1(d) for d in _walk_up(root / mount, own.get("cpu", "/"))]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path; the v2 hierarchy is under ''."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:  # "0::/user.slice/x" (v2) or "4:cpu,cpuacct:/docker/x" (v1)
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _walk_up(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each folder above it up to ``base``. Inside a container ``rel`` can name
    the host's path, absent here; then only ``base`` is found."""
    parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:  # -1 in v1: no limit
        return None
    return max(1, math.ceil(quota / period))


def _read_v2(path: Path) -> int | None:
    try:
        fields = path.read_text().split()
        if not fields or fields[0] == "max":
            return None
        return _quota_cpus(int(fields[0]), int(fields[1]) if len(fields) > 1 else 100_000)
    except (OSError, ValueError):  # absent or unreadable: no quota known here
        return None


def _read_v1(folder: Path) -> int | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _quota_cpus(quota, period)


# -- how many threads ---------------------------------------------------------------------------


def requested_threads(threads: int | None = None) -> tuple[int, str]:
    """The thread count for this process and why: ``--threads``, ``RESFIT_THREADS``, the
    user's ``OMP_NUM_THREADS``, else the fair share of :func:`available_cpus` among the live
    resfit processes. A bad value raises :class:`ConfigError` naming the option or variable."""
    n, reason, _ = _choose(threads)
    return n, reason


def _choose(threads: int | None, cpus: int | None = None) -> tuple[int, str, bool]:
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"--threads takes a whole number of at least 1 (got {threads!r})")
        return threads, f"--threads {threads}", True
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        n = _positive_int(value, THREADS_ENV)
        return n, f"{THREADS_ENV}={n}", True
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp and omp != os.environ.get(_EXPORTED_ENV):
        # OpenMP takes "4,2" as 4 threads at the outer level.
        n = _positive_int(omp.split(",")[0], "OMP_NUM_THREADS")
        return n, f"OMP_NUM_THREADS={omp}", True
    cpus = available_cpus() if cpus is None else cpus
    procs = live_processes()
    return max(1, cpus // procs), _share_reason(cpus, procs), False


def _share_reason(cpus: int, procs: int) -> str:
    s = "" if procs == 1 else "es"
    return f"{_FAIR_SHARE} of {cpus} CPUs among {procs} resfit process{s}"


def _positive_int(text: str, name: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1 (got {text!r})")
    return n


# -- the registry of live resfit processes --------------------------------------------------------


def registry_dir() -> Path:
    """The folder with one file per live resfit process: ``RESFIT_PROC_DIR``, else
    ``resfit-<uid>/procs`` in the temp folder."""
    custom = os.environ.get(PROC_DIR_ENV, "").strip()
    if custom:
        return Path(custom)
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"resfit-{user}" / "procs"


def live_processes() -> int:
    """How many resfit processes run on this machine, this one included."""
    return len(_live_entries(registry_dir(), exclude=os.getpid())) + 1


def _live_entries(folder: Path, exclude: int | None = None) -> dict[int, Path]:
    """pid -> registry file of each live resfit process; the files of dead ones are removed.
    Costs one directory listing and one /proc read per resfit process."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return {}
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    entries = {}
    for name in names:
        pid_text, _, start = name.partition("-")
        if not pid_text.isdigit() or not start.isdigit():
            continue
        pid = int(pid_text)
        if pid == exclude:
            continue
        if alive(pid, start):
            entries[pid] = folder / name
        else:
            (folder / name).unlink(missing_ok=True)  # another process may have removed it
    return entries


def _register(threads: int) -> Path | None:
    """Write this process's registry file; None (and a debug line) when it cannot be written,
    so a read-only temp folder costs the fair share, not the run."""
    folder = registry_dir()
    # The default folder has a name anyone can guess in a shared /tmp: use it only if it is ours.
    ours = [folder] if os.environ.get(PROC_DIR_ENV, "").strip() else [folder, folder.parent]
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in ours:
            if hasattr(os, "getuid") and f.stat().st_uid != os.getuid():
                raise PermissionError(f"{f} belongs to another user")
        entry = folder / f"{os.getpid()}-{start_time(os.getpid())}"
        entry.write_text(f"{threads}\n")
    except OSError as e:
        log.debug("resfit: no process registry (%s); counting this process alone", e)
        return None
    return entry


def _threads_of(entry: Path) -> int:
    try:
        return max(1, int(entry.read_text()))
    except (OSError, ValueError):  # being rewritten, or just removed
        return 1


def _unregister() -> None:
    state = _state
    if state is not None and state.entry is not None and state.pid == os.getpid():
        state.entry.unlink(missing_ok=True)  # a forked child inherits _state: pid check


# -- configure and rebalance ----------------------------------------------------------------------


def configure(threads: int | None = None) -> int:
    """Set this process's CPU threads (see the module docstring for the order) and register it.

    Sets ``torch.set_num_threads``; sets the inter-op threads on the first call only (torch
    allows that once per process); exports ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
    ``OPENBLAS_NUM_THREADS`` for child processes; logs the choice and its reason at INFO and an
    oversubscribed machine at WARNING. The registry entry goes away at exit. Returns the count.
    """
    global _state, _atexit_done
    with _lock:
        cpus = available_cpus()
        # Register before counting: of two processes starting together, the later count sees both.
        entry = _register(torch.get_num_threads())
        n, reason, explicit = _choose(threads, cpus)
        if entry is not None:
            entry.write_text(f"{n}\n")
        _apply(n, user_omp=reason.startswith("OMP_NUM_THREADS"))
        _state = _State(n, reason, explicit, cpus, os.getpid(), entry)
        if not _atexit_done:
            atexit.register(_unregister)
            _atexit_done = True
    log.info("resfit: %d CPU thread%s (%s)", n, "" if n == 1 else "s", reason)
    warning = oversubscription_warning()
    if warning:
        log.warning("resfit: %s", warning)
    return n


def is_configured() -> bool:
    """Whether :func:`configure` ran in this process (a forked child has not)."""
    return _state is not None and _state.pid == os.getpid()


def _apply(n: int, user_omp: bool, export: bool = True) -> None:
    """Set torch's count and (``export``) the environment children inherit. The environment is
    written only where a value changes: glibc's ``setenv`` may move the ``environ`` array while a
    native thread (OpenMP, oneDNN, OpenVINO) reads it with ``getenv``."""
    global _interop_done
    torch.set_num_threads(n)
    if not _interop_done:
        _interop_done = True
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # inter-op work already ran in this process: keep torch's pool
            log.debug(
                "resfit: inter-op threads already fixed at %d", torch.get_num_interop_threads()
            )
    if not export:
        return
    wanted = {var: str(n) for var in LIBRARY_ENV if not (user_omp and var == "OMP_NUM_THREADS")}
    if not user_omp:  # keep the user's OMP_NUM_THREADS as written
        wanted[_EXPORTED_ENV] = str(n)
    elif _EXPORTED_ENV in os.environ:
        del os.environ[_EXPORTED_ENV]
    for var, value in wanted.items():
        if os.environ.get(var) != value:
            os.environ[var] = value


def rebalance() -> int:
    """Move to the current fair share, between epochs of a long job: re-reads the registry (one
    directory listing) and sets the new count if it changed. A count given by ``--threads`` or
    the environment stays; without :func:`configure` nothing changes. Returns the count."""
    global _state
    with _lock:
        state = _state
        if state is None or state.pid != os.getpid():
            return torch.get_num_threads()
        others = _live_entries(registry_dir(), exclude=state.pid)
        if state.entry is not None and not state.entry.exists():  # a temp cleaner removed it
            state.entry = _register(state.threads)
        if state.explicit:
            return state.threads
        n = max(1, state.cpus // (len(others) + 1))
        if n == state.threads:
            return n
        reason = _share_reason(state.cpus, len(others) + 1)
        # Mid-run, native pools are live: torch's count moves, the environment stays (children
        # get theirs from child_env).
        _apply(n, user_omp=False, export=False)
        if state.entry is not None:
            state.entry.write_text(f"{n}\n")
        _state = dataclasses.replace(state, threads=n, reason=reason)
    log.info("resfit: %d -> %d CPU threads (%s)", state.threads, n, reason)
    return n


# -- child processes ------------------------------------------------------------------------------


def child_threads(n_children: int, threads: int | None = None) -> int:
    """Threads for each of ``n_children`` worker processes (tuning trials, server workers) that
    share this process's count: ``threads`` if given, else what :func:`configure` chose, else
    :func:`requested_threads`. At least 1 each."""
    if n_children < 1:
        raise ValueError(f"child_threads needs at least one child (got {n_children})")
    if threads is not None:
        budget = requested_threads(threads)[0]
    elif _state is not None and _state.pid == os.getpid():
        budget = _state.threads
    else:
        budget = requested_threads()[0]
    return max(1, budget // n_children)


def child_env(threads: int) -> dict[str, str]:
    """A copy of this process's environment for a child that should run ``threads`` threads:
    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``RESFIT_THREADS``
    (so a resfit child keeps the count). Pass it as ``subprocess.Popen(..., env=...)``."""
    if threads < 1:
        raise ValueError(f"child_env needs at least one thread (got {threads})")
    env = dict(os.environ)
    for var in (*LIBRARY_ENV, THREADS_ENV):
        env[var] = str(threads)
    env.pop(_EXPORTED_ENV, None)
    return env


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` for a DataLoader: one thread per worker, also for what it starts.
    Per-image transforms are too small to split: a 32 px random affine takes 0.33 ms on one
    thread and 2.5 ms on two."""
    torch.set_num_threads(1)
    for var in (*LIBRARY_ENV, THREADS_ENV):
        os.environ[var] = "1"
    os.environ.pop(_EXPORTED_ENV, None)


# -- oversubscription -----------------------------------------------------------------------------


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def oversubscription_warning() -> str | None:
    """One line when the CPUs are oversubscribed, saying what to do; else None.

    Two signs: the live resfit processes' threads (from the registry) add up to more than
    :func:`available_cpus`; or the 1-minute load average plus this process's threads exceed
    them by more than half a CPU (the average is noisy). The load is the whole machine's, so it
    counts only where this process may use every CPU of the machine. Meant for the start of a
    process, before its own threads show in the load.
    """
    cpus = available_cpus()
    entries = _live_entries(registry_dir())
    state = _state if _state is not None and _state.pid == os.getpid() else None
    own = state.threads if state is not None else torch.get_num_threads()
    total = sum(_threads_of(e) for e in entries.values())
    if os.getpid() not in entries:
        total += own
    procs = len(entries) + (os.getpid() not in entries)
    if total > cpus:
        share = max(1, cpus // procs)
        todo = (
            f"pass --threads {share} (or set {THREADS_ENV}={share})"
            if total > procs
            else "run fewer at once"
        )
        who = "this resfit process runs" if procs == 1 else f"{procs} resfit processes run"
        return f"{who} {total} threads on {cpus} CPUs, so the threads slow each other down; {todo}"
    load = _load_average()
    if load is not None and cpus >= (os.cpu_count() or cpus) and load + own > cpus + 0.5:
        free = max(1, int(cpus - load))
        todo = f"pass --threads {free}" if own > free else "run it when the machine is quieter"
        return f"the CPUs are busy (1-minute load {load:.1f} on {cpus} CPUs) and this process adds {own} threads; {todo}"
    return None

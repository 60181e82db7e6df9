"""resfit.core.threads: each resfit process takes its share of the cores (issue 13, defect 13).

Two processes that each took every core ran 64 and 3.8 img/s where one alone ran 304. The
side-by-side tests start real processes that share a registry folder in tmp_path; the CPU count
comes from RESFIT_CPUS, so they hold on any machine.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from resfit.core import threads
from resfit.core.errors import ConfigError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the registry is POSIX-only")

THREAD_VARS = ("RESFIT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No thread variables from the caller; a private registry folder, returned."""
    for var in (*THREAD_VARS, threads.CPUS_ENV, threads._EXPORTED_ENV):
        monkeypatch.delenv(var, raising=False)
    procs = tmp_path / "procs"
    monkeypatch.setenv(threads.PROC_DIR_ENV, str(procs))
    # What an earlier configure() in this process chose (a training test) is not this test's.
    monkeypatch.setattr(threads, "_state", None)
    return procs


# -- CPUs: affinity and cgroup quota --------------------------------------------------------------


def _cgroup(root: Path, files: dict[str, str], own: str = "0::/\n") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = root / "self-cgroup"
    proc.write_text(own)
    return root, proc


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("400000 100000", 4)],
)
def test_cgroup_v2_quota_rounds_up(tmp_path: Path, cpu_max: str, cpus: int | None) -> None:
    assert threads.cgroup_cpu_limit(*_cgroup(tmp_path, {"cpu.max": cpu_max})) == cpus


def test_cgroup_v2_parent_quota_binds_nested_group(tmp_path: Path) -> None:
    files = {"cpu.max": "max 100000", "a/cpu.max": "100000 100000", "a/b/cpu.max": "max 100000"}
    assert threads.cgroup_cpu_limit(*_cgroup(tmp_path, files, own="0::/a/b\n")) == 1


@pytest.mark.parametrize(("quota", "cpus"), [("150000\n", 2), ("-1\n", None)])
def test_cgroup_v1_quota(tmp_path: Path, quota: str, cpus: int | None) -> None:
    files = {"cpu,cpuacct/cpu.cfs_quota_us": quota, "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    own = "4:cpu,cpuacct:/\n1:name=systemd:/\n"
    assert threads.cgroup_cpu_limit(*_cgroup(tmp_path, files, own=own)) == cpus


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path / "none", tmp_path / "none-cgroup") is None


@pytest.mark.parametrize(
    ("cpu_max", "cpus"), [("200000 100000", 2), ("1600000 100000", 8), ("", 8)]
)
def test_available_cpus_is_affinity_capped_by_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: Path, cpu_max: str, cpus: int
) -> None:
    root, proc = _cgroup(tmp_path / "cg", {"cpu.max": cpu_max} if cpu_max else {})
    monkeypatch.setattr(threads, "CGROUP_ROOT", root)
    monkeypatch.setattr(threads, "PROC_SELF_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.available_cpus() == cpus
    monkeypatch.setenv(threads.CPUS_ENV, "3")
    assert threads.available_cpus() == 3


# -- which count: precedence and bad values -------------------------------------------------------


def test_precedence_threads_then_resfit_env_then_omp_then_fair_share(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.setenv(threads.CPUS_ENV, "4")
    monkeypatch.setenv("RESFIT_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.requested_threads(2) == (2, "--threads 2")
    assert threads.requested_threads() == (3, "RESFIT_THREADS=3")
    monkeypatch.delenv("RESFIT_THREADS")
    assert threads.requested_threads() == (5, "OMP_NUM_THREADS=5")
    monkeypatch.setenv("OMP_NUM_THREADS", "6,2")  # OpenMP's nested form: 6 at the outer level
    assert threads.requested_threads()[0] == 6
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, reason = threads.requested_threads()
    assert (n, reason) == (4, "fair share of 4 CPUs among 1 resfit process")


def test_omp_exported_by_a_resfit_parent_is_not_the_users_choice(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    # configure() in a parent exported OMP_NUM_THREADS=2 and marked it; a resfit child started
    # with that environment takes its own fair share instead of inheriting the parent's count.
    monkeypatch.setenv(threads.CPUS_ENV, "8")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(threads._EXPORTED_ENV, "2")
    assert threads.requested_threads()[0] == 8


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
@pytest.mark.parametrize("var", ["RESFIT_THREADS", "OMP_NUM_THREADS", "RESFIT_CPUS"])
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        threads.requested_threads()


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_threads_option_names_it(clean_env: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="--threads"):
        threads.requested_threads(value)  # type: ignore[arg-type]


# -- the registry ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_dead_processes_are_not_counted_and_their_files_go(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    clean_env.mkdir()
    parent = clean_env / f"{os.getppid()}-{threads.start_time(os.getppid())}"
    stale = clean_env / f"{_dead_pid()}-12345"
    reused = clean_env / f"{os.getppid()}-1"  # the parent's pid, another start: a reused pid
    for entry in (parent, stale, reused):
        entry.write_text("1\n")
    monkeypatch.setenv(threads.CPUS_ENV, "4")
    assert threads.live_processes() == 2  # this one and the (living) parent
    assert sorted(p.name for p in clean_env.iterdir()) == [parent.name]
    assert threads.requested_threads() == (2, "fair share of 4 CPUs among 2 resfit processes")


def test_oversubscription_warning_counts_registered_threads(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.setenv(threads.CPUS_ENV, "2")
    monkeypatch.setattr(threads, "_load_average", lambda: 0.0)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 1)
    clean_env.mkdir()
    other = clean_env / f"{os.getppid()}-{threads.start_time(os.getppid())}"
    other.write_text("1\n")
    assert threads.oversubscription_warning() is None  # 1 + 1 threads on 2 CPUs
    other.write_text("4\n")
    warning = threads.oversubscription_warning()
    assert warning is not None and "5 threads on 2 CPUs" in warning
    assert "--threads 1" in warning and "\n" not in warning


def test_oversubscription_warning_reads_the_load(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    cpus = os.cpu_count() or 1
    monkeypatch.setenv(threads.CPUS_ENV, str(cpus))  # the whole machine: its load is ours
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: cpus)
    monkeypatch.setattr(threads, "_load_average", lambda: 0.2)
    assert threads.oversubscription_warning() is None
    monkeypatch.setattr(threads, "_load_average", lambda: cpus + 1.0)
    warning = threads.oversubscription_warning()
    assert warning is not None and "load" in warning and "\n" not in warning


def test_child_share_and_environment(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    assert threads.child_threads(2, threads=4) == 2
    assert threads.child_threads(3, threads=2) == 1
    monkeypatch.setenv(threads._EXPORTED_ENV, "4")
    env = threads.child_env(3)
    assert {var: env[var] for var in THREAD_VARS} == dict.fromkeys(THREAD_VARS, "3")
    assert threads._EXPORTED_ENV not in env  # the child reads its 3 as given, not as a leftover
    assert os.environ.get("OMP_NUM_THREADS") is None  # a copy: this process is untouched
    with pytest.raises(ConfigError, match="--threads"):
        threads.child_threads(2, threads=0)


# -- real processes -------------------------------------------------------------------------------

# Configures, prints its count and torch's, then rebalances once per line read from stdin.
JOB = """
import sys
import torch
from resfit.core import threads
n = threads.configure(int(sys.argv[1]) if len(sys.argv) > 1 else None)
print(n, torch.get_num_threads(), flush=True)
for _ in sys.stdin:
    print(threads.rebalance(), torch.get_num_threads(), flush=True)
"""


def _env(procs: Path, cpus: int = 2) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.pop(threads._EXPORTED_ENV, None)
    env.update({threads.PROC_DIR_ENV: str(procs), threads.CPUS_ENV: str(cpus)})
    return env


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", JOB, *args]
    return subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The process's next line; fails (and ends it) if none comes within the timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"no answer from the process; stderr:\n{proc.communicate(timeout=30)[1]}")
    return line.strip()


def _rebalance(proc: subprocess.Popen[str]) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return _read(proc)


def _finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=60)  # closes stdin: the job ends, its atexit runs
    assert proc.returncode == 0, err


def test_two_processes_side_by_side_share_the_cores(tmp_path: Path) -> None:
    env = _env(tmp_path / "procs", cpus=2)
    first = _start(env)
    try:
        assert _read(first) == "2 2"  # alone: both CPUs
        second = _start(env)
        try:
            assert _read(second) == "1 1"  # two resfit processes on 2 CPUs
            assert _rebalance(first) == "1 1"  # the first gives a core back
        finally:
            _finish(second)
        assert _rebalance(first) == "2 2"  # and takes it back when the second has ended
    finally:
        _finish(first)
    assert list((tmp_path / "procs").iterdir()) == []  # both unregistered at exit


def test_explicit_threads_are_kept_by_rebalance(tmp_path: Path) -> None:
    env = _env(tmp_path / "procs", cpus=2)
    first = _start(env, "2")
    try:
        assert _read(first) == "2 2"
        second = _start(env)
        try:
            assert _read(second) == "1 1"  # the explicit process still counts as one
            assert _rebalance(first) == "2 2"  # --threads 2 stays 2
        finally:
            _finish(second)
    finally:
        _finish(first)


def test_configure_logs_its_choice_warns_and_may_be_called_again(tmp_path: Path) -> None:
    script = (
        "import logging, os, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "from resfit.core import threads\n"
        "threads.configure(4)\n"
        "threads.configure(1)\n"  # a second call must not trip torch's once-only interop setter
        "print(torch.get_num_threads(), torch.get_num_interop_threads(),"
        " os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])\n"
    )
    env = _env(tmp_path / "procs", cpus=2)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "4", "1", "1"]
    assert "INFO resfit resfit: 4 CPU threads (--threads 4)" in out.stderr
    assert "WARNING resfit resfit: this resfit process runs 4 threads on 2 CPUs" in out.stderr


def test_worker_init_gives_one_thread(tmp_path: Path) -> None:
    script = (
        "import os, torch\n"
        "from resfit.core import threads\n"
        "threads.worker_init(0)\n"
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ['RESFIT_THREADS'])\n"
    )
    env = _env(tmp_path / "procs", cpus=2)
    env["OMP_NUM_THREADS"] = "2"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


def test_alive_without_proc_asks_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc does not tell (start time '0': macOS, Windows), a pid is alive when signal 0
    reaches it: True for this process, False for a pid that has exited."""
    import subprocess
    import sys

    from resfit.core.procs import alive

    assert alive(os.getpid(), "0") is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert alive(child.pid, "0") is False

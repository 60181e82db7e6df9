"""Runs that survive what the disk does: a size limit, a cut checkpoint, a killed writer's
temporary files, and an exception that must not leave data workers behind (issue 26)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .images import make_colour_folder

ARGS = ["--arch", "resnet20_cifar", "--img-size", "16", "--batch-size", "16", "--augment", "light",
        "--no-progress", "--no-report", "--seed", "1"]  # fmt: skip


def _cli(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def limited() -> None:  # in the child: a real file-size limit, as a full disk or quota
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "resfit", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limited if limit else None)  # fmt: skip


def _epochs(run: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().split()[1:]]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=8,
                              splits=("train", "val"))  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_run_on_a_size_limited_disk_keeps_its_checkpoint_and_finishes(
    colours: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert _cli("train", str(colours), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    last = run / "checkpoints" / "last.pt"
    model_size, last_size = (run / "model.safetensors").stat().st_size, last.stat().st_size
    assert model_size * 1.3 < last_size  # the optimizer's state makes the checkpoint larger
    # The model fits under the limit, the resume checkpoint does not (torch.save raises
    # RuntimeError from its zip writer there, not OSError).
    res = _cli("train", "--out", str(run), "--resume", "--epochs", "3",
               limit=int(model_size * 1.15))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert _epochs(run) == [1, 2, 3]
    assert torch.load(last, weights_only=True)["epoch"] == 1  # the previous one, intact
    summary = json.loads((run / "summary.json").read_text())
    (entry,) = summary["not_saved"]
    assert entry["file"] == str(last) and entry["epochs"] == [2, 3] and entry["error"]
    assert "not saved: " in res.stderr
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]


def test_a_cut_last_checkpoint_resumes_from_the_one_before(colours: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _cli("train", str(colours), "--out", str(run), "--epochs", "2", *ARGS).returncode == 0
    ck = run / "checkpoints"
    assert torch.load(ck / "last.prev.pt", weights_only=True)["epoch"] == 1
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2])  # a power cut in the middle
    res = _cli("train", "--out", str(run), "--resume", "--epochs", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cannot read the checkpoint" in res.stderr and "last.prev.pt" in res.stderr
    assert _epochs(run) == [1, 2, 3]  # epoch 2 again, from the checkpoint after epoch 1
    assert torch.load(ck / "last.pt", weights_only=True)["epoch"] == 3

    # Neither readable: one clear line, no traceback.
    for name in ("last.pt", "last.prev.pt"):
        (ck / name).write_bytes(b"cut")
    res = _cli("train", "--out", str(run), "--resume", "--epochs", "4")
    assert res.returncode != 0 and "no readable checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_killed_writers_temporary_files_are_removed_at_the_next_start(
    colours: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert _cli("train", str(colours), "--out", str(run), "--epochs", "1", *ARGS).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a writer that was killed
    stale = [run / "checkpoints" / f".last.pt.tmp-{dead.pid}", run / f".metrics.csv.tmp-{dead.pid}"]
    kept = [
        run / "checkpoints" / f".last.pt.tmp-{os.getpid()}",  # a live writer's (this test)
        run / "checkpoints" / "notes.tmp-1",  # not resfit's name
        run / f".summary.json.tmp-{dead.pid}x",
    ]
    for p in stale + kept:
        p.write_bytes(b"x" * 1000)
    assert _cli("train", "--out", str(run), "--resume", "--epochs", "2").returncode == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_a_run_that_fails_mid_epoch_ends_its_data_workers_at_once(
    colours: Path, tmp_path: Path
) -> None:
    """Issue 26: the paused batch generator (and its worker processes) lived on in a
    reference cycle until a cyclic garbage collection."""
    import gc
    import multiprocessing

    from resfit.training import TrainConfig, train
    from resfit.training.loop import Callback

    class Boom(Callback):
        def after_step(self, loop) -> None:
            if loop.step_in_epoch == 1:
                raise RuntimeError("boom")

    cfg = TrainConfig.from_options(data=str(colours), out=str(tmp_path / "run"), epochs=2,
                                   workers=2, arch="resnet20_cifar", img_size=16, batch_size=4,
                                   progress=False, report=False)  # fmt: skip
    assert not multiprocessing.active_children()
    gc.disable()  # no collection may end them for us
    try:
        with pytest.raises(RuntimeError, match="boom") as caught:
            train(cfg, callbacks=[Boom()])
        assert caught.value.__traceback__ is not None  # the frames (and the loop) are held
        assert not multiprocessing.active_children()
    finally:
        gc.enable()


@pytest.mark.skipif(not Path("/proc/1/stat").exists(), reason="process start times from /proc")
def test_a_temporary_file_of_a_reused_pid_is_stale_and_a_live_writers_is_not(
    tmp_path: Path,
) -> None:
    from resfit.core.atomic import remove_stale_temps, temp_path
    from resfit.core.procs import start_time

    live, reused = tmp_path / ".a.pt.tmp-1", tmp_path / ".b.pt.tmp-1"  # pid 1 runs all along
    live.write_bytes(b"x")
    reused.write_bytes(b"x")
    os.utime(reused, (1, 1))  # written before pid 1's process started: another process's
    assert remove_stale_temps(tmp_path) == [reused]
    assert live.exists() and not reused.exists()
    # Today's names carry the writer's start time: a pid reused moments after its writer was
    # killed (no time for the file's mtime to tell) is told by the start time alone.
    own = temp_path(tmp_path / "c.pt")
    assert own.name == f".c.pt.tmp-{os.getpid()}-{start_time(os.getpid())}"
    start = int(start_time(1))
    writer = tmp_path / f".d.pt.tmp-1-{start}"  # pid 1's own, however old
    other = tmp_path / f".e.pt.tmp-1-{start + 1}"  # a writer that held pid 1 before
    gone = tmp_path / f".f.pt.old-999999999-{start}"  # no such pid
    for p in (writer, other, gone):
        p.write_bytes(b"x")
    os.utime(writer, (1, 1))
    assert sorted(remove_stale_temps(tmp_path)) == sorted([other, gone])
    assert writer.exists() and live.exists()

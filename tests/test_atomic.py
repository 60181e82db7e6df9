"""The one atomic writer (resfit.core.atomic) and the run folder's owner (resfit.runs)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from resfit.core import atomic
from resfit.core.atomic import (
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync was called on (a file or a folder), in order."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_content_arrives_whole_and_file_and_folder_are_fsynced(tmp_path, fsyncs):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": [1, 2, 3]})
    assert json.loads(target.read_text()) == {"a": [1, 2, 3]}
    assert target.read_text() == json.dumps({"a": [1, 2, 3]}, indent=2)
    # the temporary file is fsynced before the rename (its name, then renamed), then the folder
    assert len(fsyncs) == 2
    assert Path(fsyncs[0]).name == atomic.temp_path(target).name
    assert fsyncs[1] == str(tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write_text(p, "new text"),
        lambda p: atomic_write_bytes(p, b"new bytes"),
        lambda p: atomic_save({"x": 1}, p),
    ],
)
def test_each_writer_fsyncs_file_then_folder(tmp_path, fsyncs, write):
    target = tmp_path / "f.bin"
    write(target)
    assert target.exists() and len(fsyncs) == 2 and fsyncs[-1] == str(tmp_path)


def test_failure_in_the_middle_keeps_the_old_file_and_leaves_no_temp(tmp_path, fsyncs):
    target = tmp_path / "metrics.csv"
    target.write_text("old,content\n")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("new,half")
        assert atomic.temp_path(target).exists()  # written beside the target, not over it
        raise RuntimeError("disk full")
    assert target.read_text() == "old,content\n"
    assert _leftovers(tmp_path) == []
    assert fsyncs == []  # nothing was put in place

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("from a library")
        raise RuntimeError("the library failed")
    assert target.read_text() == "old,content\n"
    assert _leftovers(tmp_path) == []


def test_temporary_name_is_recognisable(tmp_path):
    tmp = atomic.temp_path(tmp_path / "model.safetensors")
    assert tmp.parent == tmp_path
    from resfit.core.procs import start_time

    start = start_time(os.getpid())  # the writer's start time, where /proc tells it
    tail = f"{os.getpid()}" if start == "0" else f"{os.getpid()}-{start}"
    assert tmp.name == f".model.safetensors.tmp-{tail}"


def test_path_writer_for_libraries(tmp_path, fsyncs):
    target = tmp_path / "weights.pt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        tmp.write_bytes(b"x" * 10)
    assert target.read_bytes() == b"x" * 10
    assert [Path(p).name for p in fsyncs] == [atomic.temp_path(target).name, tmp_path.name]


def test_folder_replaced_whole_or_not_at_all(tmp_path, fsyncs):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert _leftovers(tmp_path) == []
    assert fsyncs[-1] == str(tmp_path)


def test_run_paths_name_the_on_disk_contract(tmp_path):
    from resfit.runs import RunPaths

    r = RunPaths(tmp_path)
    assert r.config == tmp_path / "config.json"
    assert r.classes == tmp_path / "classes.json"
    assert r.splits == tmp_path / "splits.csv"
    assert r.model == tmp_path / "model.safetensors"
    assert r.calibration == tmp_path / "calibration.json"
    assert r.thresholds == tmp_path / "thresholds.json"
    assert r.metrics == tmp_path / "metrics.csv"
    assert r.last == tmp_path / "checkpoints" / "last.pt"
    assert r.best == tmp_path / "checkpoints" / "best.safetensors"
    assert r.eval("test") == tmp_path / "eval-test"
    assert not r.started()


def test_runs_reads_what_it_writes(tmp_path):
    import torch

    from resfit import runs
    from resfit.inference.predictor import load_run

    with pytest.raises(runs.RunError, match="config.json is missing"):
        load_run(tmp_path)
    runs.write_config(tmp_path, {"arch": "resnet18"}, ["cat", "dog"])
    runs.write_model(tmp_path, {"w": torch.ones(2)})
    runs.write_calibration(tmp_path, {"temperature": 1.5})
    runs.write_thresholds(tmp_path, {"dog": 0.3})
    assert load_run(tmp_path) == ({"arch": "resnet18"}, ["cat", "dog"])
    assert runs.read_temperature(tmp_path) == 1.5
    assert runs.read_thresholds(tmp_path, ["cat", "dog"]) == [0.5, 0.3]
    assert torch.equal(runs.load_weights(tmp_path)["w"], torch.ones(2))
    assert len(runs.model_sha256(tmp_path)) == 64
    assert runs.RunPaths(tmp_path).started()


def test_runs_imports_only_core_at_module_level():
    src = Path(__file__).resolve().parents[1] / "src" / "resfit" / "runs.py"
    tree = ast.parse(src.read_text())
    for node in tree.body:  # module level only: lazy imports in functions may reach further
        if isinstance(node, ast.ImportFrom) and node.level:
            assert (node.module or "").startswith("core"), node.module
        if isinstance(node, ast.ImportFrom | ast.Import) and not getattr(node, "level", 0):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            assert not any(n and n.startswith("resfit") for n in names)
    imported = {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level and n.module
    }
    banned = ("training", "inference", "export", "insight", "quality", "apps")
    assert not any(m.split(".")[0] in banned for m in imported)

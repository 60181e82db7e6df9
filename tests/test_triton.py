"""The Triton model repository (resfit.export.triton, `resfit export RUN --format triton`): its
layout and config values. The server itself is not available here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resfit.core.errors import ConfigError, ExportError
from resfit.export.triton import triton_config, write_triton_repository

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from resfit.export.onnx import export_onnx
    from resfit.models.resnet import build_model

    torch.manual_seed(0)
    model = build_model("resnet20_cifar", num_classes=3)
    return export_onnx(model, tmp_path_factory.mktemp("tr") / "m.onnx", input_size=32)


def _field(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{key}: (.+)$", text, flags=re.M)


def test_repository_layout_and_config(onnx_file: Path, tmp_path: Path) -> None:
    model_dir = write_triton_repository(
        onnx_file, tmp_path / "repo", "flowers", classes=["a", "b", "c"], max_batch=16,
        max_queue_delay_us=2000,
    )  # fmt: skip
    assert model_dir == tmp_path / "repo" / "flowers"
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    assert files == ["1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == ["a", "b", "c"]
    cfg = (model_dir / "config.pbtxt").read_text()
    assert _field(cfg, "name") == ['"flowers"', '"input"', '"logits"']
    assert _field(cfg, "platform") == ['"onnxruntime_onnx"']
    assert _field(cfg, "max_batch_size") == ["16"]
    assert _field(cfg, "dims") == ["[ 3, 32, 32 ]", "[ 3 ]"]  # no batch axis: Triton adds it
    assert _field(cfg, "preferred_batch_size") == ["[ 4, 8, 16 ]"]
    assert _field(cfg, "max_queue_delay_microseconds") == ["2000"]
    assert _field(cfg, "kind") == ["KIND_CPU"] and "dynamic_batching {" in cfg
    assert cfg.count("{") == cfg.count("}") and cfg.count("[") == cfg.count("]")
    assert not list((tmp_path / "repo").glob(".*"))  # no temporary folder left behind


def test_rewrite_replaces_the_model(onnx_file: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_triton_repository(onnx_file, repo, "m", classes=["a", "b", "c"])
    (repo / "m" / "stale.txt").write_text("old")
    write_triton_repository(onnx_file, repo, "m", classes=["x", "y", "z"], max_batch=8)
    assert not (repo / "m" / "stale.txt").exists()
    assert (repo / "m" / "labels.txt").read_text() == "x\ny\nz\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "bad name/x"}, ConfigError, "Triton model name"),
        ({"classes": ["a"]}, ExportError, "3 outputs but 1 class names"),
        ({"max_batch": 0}, ConfigError, "--max-batch must be at least 1"),
    ],
)
def test_bad_inputs_one_line(onnx_file, tmp_path, kwargs, error, message) -> None:
    args = {"name": "m", "classes": ["a", "b", "c"], **kwargs}
    with pytest.raises(error, match=message) as e:
        write_triton_repository(onnx_file, tmp_path / "repo", args.pop("name"), **args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "repo" / "m").exists()


def test_config_gpu_instances() -> None:
    cfg = triton_config("m", [3, 224, 224], 1000, max_batch=64, instances=2, kind="KIND_GPU")
    assert _field(cfg, "count") == ["2"] and _field(cfg, "kind") == ["KIND_GPU"]
    assert _field(cfg, "preferred_batch_size") == ["[ 4, 8, 16, 32, 64 ]"]


def test_export_run_writes_the_repository(tmp_path: Path) -> None:
    from resfit.export.run import export_run

    from .test_export import make_colour_folder
    from .test_inference import make_run

    data = make_colour_folder(tmp_path / "data", per_class=4, splits=("train", "val"))
    run = make_run(tmp_path, data=str(data))
    info = export_run(run, val=data / "val", format="triton", name="colours", opset=17)
    model_dir = Path(info["triton"])
    assert model_dir == Path(run) / "export" / "triton" / "colours"
    assert (model_dir / "1" / "model.onnx").read_bytes() == Path(info["onnx"]).read_bytes()
    classes = (model_dir / "labels.txt").read_text().splitlines()
    assert _field((model_dir / "config.pbtxt").read_text(), "dims")[1] == f"[ {len(classes)} ]"


def test_labels_hold_one_line_per_class_whatever_the_name(onnx_file: Path, tmp_path: Path) -> None:
    """Issue 26: a non-UTF-8 name crashed the export, a newline shifted every later label."""
    import os

    classes = [os.fsdecode(b"caf\xe9"), "two\nlines", "c"]
    model_dir = write_triton_repository(onnx_file, tmp_path / "repo", "m", classes=classes)
    text = (model_dir / "labels.txt").read_bytes().decode("utf-8")  # valid UTF-8
    assert text.splitlines() == ["caf\\xe9", "two\\nlines", "c"]

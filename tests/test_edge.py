"""Small-device exports (issue 29, items 3-4): ExecuTorch, LiteRT and NCNN files run in their own
runtimes here and agree with PyTorch on real photos (CIFAR-10 test photos, through a run
fine-tuned from the real ResNet-20 checkpoint); int8 stays within a point; CoreML is checked
for structure; a missing runtime is one line with the install command."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from resfit.core.errors import ConfigError, MissingExtraError
from resfit.export.run import export_run
from resfit.inference.predictor import Predictor
from resfit.training import train

from .conftest import CIFAR_CKPTS, need

pytest.importorskip("executorch", reason="needs the optional edge extra (resfit[edge])")
pytest.importorskip("ai_edge_litert", reason="needs the optional edge extra (resfit[edge])")
pytest.importorskip("ncnn", reason="needs the optional edge extra (resfit[edge])")


@pytest.fixture(scope="module")
def photos(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training and 30 validation photos per class of cifar10-jpg."""
    out = tmp_path_factory.mktemp("cifar-small")
    for split, source, n in (("train", "train", 40), ("val", "test", 30)):
        for cls in sorted(p for p in (cifar10_root / source).iterdir() if p.is_dir()):
            (out / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.jpg"))[:n]:
                shutil.copy(f, out / split / cls.name / f.name)
    return out


@pytest.fixture(scope="module")
def run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run fine-tuned for one epoch from the real ResNet-20 CIFAR-10 checkpoint."""
    need(CIFAR_CKPTS)
    out = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESFIT_WEIGHTS_MIRROR", str(CIFAR_CKPTS))
        mp.setenv("RESFIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        train(data=str(photos), out=str(out), arch="resnet20_cifar", weights="pretrained",
              epochs=1, batch_size=32, lr=0.01, progress=False, report=False, leakage="off",
              precision="fp32")  # fmt: skip
    return out


def _check_fp32(rep: dict) -> None:
    assert rep["val_images"] == 300
    assert rep["top1_agreement"] >= 0.99, rep
    assert abs(rep["accuracy_change"]) <= 0.01, rep
    assert rep["size_bytes"] > 100_000  # the ResNet-20's 0.27 M weights are in the file


def test_executorch_fp32_round_trips(run: Path) -> None:
    rep = export_run(run, format="executorch")
    _check_fp32(rep)
    assert rep["pytorch_accuracy"] > 0.5  # a real model: the comparisons mean something
    assert json.loads((run / "export" / "export.json").read_text())["format"] == "executorch"


@pytest.mark.slow
@pytest.mark.parametrize("format", ["executorch", "litert"])
def test_int8_stays_within_a_point(run: Path, photos: Path, format: str) -> None:
    rep = export_run(run, format=format, int8=True, calib=photos / "train", calib_images=100)
    _check_fp32(rep)
    assert abs(rep["int8_accuracy_change"]) <= 0.01, rep
    assert rep["int8_size_bytes"] < rep["size_bytes"] / 2


@pytest.mark.slow  # 6 s of conversion: LiteRT fp32 is also checked by the int8 test below
def test_litert_fp32_round_trips(run: Path) -> None:
    _check_fp32(export_run(run, format="litert"))
    assert (run / "export" / "litert" / "model.tflite").is_file()


def test_ncnn_fp32_round_trips_and_int8_says_why_not(run: Path, photos: Path) -> None:
    _check_fp32(export_run(run, format="ncnn"))
    assert (run / "export" / "ncnn" / "model.ncnn.bin").is_file()
    with pytest.raises(ConfigError, match="ncnn2int8"):
        export_run(run, format="ncnn", int8=True, calib=photos / "train")


def test_coreml_is_converted_and_checked_for_structure_only(run: Path) -> None:
    pytest.importorskip("coremltools", reason="needs the optional edge extra (resfit[edge])")
    rep = export_run(run, format="coreml")
    assert rep["coreml_input"] == [1, 3, 32, 32] and rep["coreml_output"][-1] == 10
    assert "Apple" in rep["coreml_note"] and "top1_agreement" not in rep
    assert (run / "export" / "coreml" / "model.mlpackage" / "Manifest.json").is_file()


def test_predict_runs_each_exported_file(run: Path, photos: Path) -> None:
    images = sorted((photos / "val").glob("*/*.jpg"))[::10]
    want = [p.label for p in Predictor.from_run(run, engine="torch").predict(images)[0]]
    for engine in ("executorch", "ncnn"):
        if not (run / "export" / engine).is_dir():
            export_run(run, format=engine)
        p = Predictor.from_run(run, engine=engine, precision="fp32")
        got = [x.label for x in p.predict(images)[0]]
        assert sum(a == b for a, b in zip(got, want, strict=True)) >= len(want) - 1, engine


def test_a_missing_runtime_is_one_line_with_the_install_command(run: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ncnn", None)  # import ncnn now raises ImportError
    with pytest.raises(MissingExtraError) as e:
        Predictor.from_run(run, engine="ncnn")
    assert "pip install 'resfit[edge]'" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "pnnx", None)
    with pytest.raises(MissingExtraError, match=r"resfit\[edge\]"):
        export_run(run, format="ncnn")


def test_bench_deploy_tables_every_export_and_fills_the_reports_section(run: Path) -> None:
    from resfit.apps.benchmark.deploy import bench_deploy

    for fmt in ("executorch", "ncnn"):
        if not (run / "export" / fmt).is_dir():
            export_run(run, format=fmt)
    page = run / "report.html"
    page.write_text(
        '<nav><a href="#config">Config</a></nav><section id="config">c</section></body>'
    )
    rep = bench_deploy(run, images=100, repeats=3)
    rows = {(r.format, r.precision): r for r in rep.rows}
    assert {("pytorch", "fp32"), ("executorch", "fp32"), ("ncnn", "fp32")} <= set(rows)
    for r in rows.values():
        if r.format == "coreml":
            assert r.latency_1t_ms is None and "Apple" in r.note
            continue
        if r.precision == "fp32":  # the same function: the same answers and confidences
            assert r.agreement >= 0.99 and abs(r.top1_change) <= 0.01 and abs(r.ece_change) < 0.01
        else:  # int8 files a slow test above may have left: within a point (2 on 100 images)
            assert abs(r.top1_change) <= 0.02
        assert r.latency_1t_ms > 0 and r.images_per_s > 0
    assert json.loads((run / "export" / "deploy.json").read_text())["val_images"] == 100
    html = page.read_text()
    assert html.index('id="deploy"') < html.index('id="config"') and 'href="#deploy"' in html
    bench_deploy(run, images=20, repeats=1)  # a second table replaces the first
    assert page.read_text().count('id="deploy"') == 1

"""resfit.benchmark and `resfit bench`: the figures compare like with like and are well formed.

Speed itself is never asserted (a figure is a benchmark, not a test); what is asserted is
what would make a benchmark lie: engines that give other answers, steps from other weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from resfit.apps.benchmark import common as benchmark
from resfit.apps.benchmark import inference, pipeline, train
from resfit.cli import main
from resfit.core import runtime
from resfit.models import weights

from .images import make_colour_folder


def test_median_time_reports_median_of_samples() -> None:
    calls = []
    t = benchmark.median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.samples) == 5
    assert t.best <= t.median == sorted(t.samples)[2]


def test_forward_gflop_matches_resnet50_published_figure() -> None:
    # ResNet-50 at 224 px: 4.09 GMACs (torchvision's metadata), i.e. 8.2 GFLOP.
    gflop = benchmark.forward_gflop(weights.create_model("resnet50"), (3, 224, 224))
    assert gflop == pytest.approx(8.18, abs=0.05)


def test_inference_engines_agree_with_the_baseline(tmp_path: Path) -> None:
    data = make_colour_folder(tmp_path / "data", per_class=4, size=40)
    report = inference.bench_inference(
        "resnet20_cifar", data=data, batch=8, repeats=1, compile=False, bf16=False
    )
    assert "32 px" in report.title  # the CIFAR net's own input size
    names = [r.name for r in report.rows]
    assert names[0] == "eager fp32 (baseline)"
    assert {"ONNX Runtime fp32", "ONNX Runtime int8"} <= set(names), report.format()
    base = report.rows[0]
    assert base.ratio == pytest.approx(1.0) and base.latency_ratio == pytest.approx(1.0)
    for r in report.rows:
        assert r.images_per_s > 0 and math.isfinite(r.roof_fraction), r
        if r.precision == "fp32":  # BN folding and ONNX export must not change the answers
            assert r.agreement == 1.0, r
    assert report.info["GFLOP per image"] == pytest.approx(0.08, abs=0.01)
    table = report.format()
    assert all(n in table for n in names) and "top-1 agree" in table


def test_train_step_starts_from_the_same_weights_and_batch() -> None:
    report = train.bench_train_step(
        "resnet18", batch=4, img_size=64, num_classes=5, repeats=1, bf16=False
    )
    naive, ours = report.rows
    auto = runtime.pick_precision(runtime.pick_device("auto"))
    assert (
        naive.name.startswith("naive torchvision") and ours.name == f"resfit {auto} channels-last"
    )
    # Same weights and batch: equal in fp32; within bf16 rounding where auto picks bf16.
    assert naive.first_loss == pytest.approx(ours.first_loss, rel=1e-4 if auto == "fp32" else 2e-2)
    assert ours.images_per_s > 0 and naive.ratio == pytest.approx(1.0)
    assert report.info["resfit auto precision"] == auto


def test_train_step_times_the_step_training_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # resfit's row must time TrainStep itself, not a copy of it that could drift from it.
    from resfit.training.step import TrainStep

    calls: list[tuple[str, bool, bool]] = []
    real = TrainStep.__call__

    def spy(self, net, x, y):
        calls.append((self.precision, self.channels_last, net.training))
        return real(self, net, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    report = train.bench_train_step(
        "resnet20_cifar", batch=4, num_classes=5, repeats=2, bf16=False, device="cpu"
    )
    auto = runtime.pick_precision(runtime.pick_device("cpu"))
    assert [r.name for r in report.rows] == [
        "naive fp32 NCHW (baseline)",
        f"resfit {auto} channels-last",
    ]
    # The warm-up step and two timed rounds, all through TrainStep, in train mode.
    assert calls == [(auto, True, True)] * 3
    naive, ours = report.rows
    assert naive.first_loss == pytest.approx(ours.first_loss, rel=1e-4 if auto == "fp32" else 2e-2)


def test_pipeline_counts_every_image(tmp_path: Path) -> None:
    data = make_colour_folder(tmp_path / "data", per_class=6, size=40)
    report = pipeline.bench_pipeline(
        data, img_size=32, limit=100, batch=4, epochs=1, consumer_images_per_s=10.0
    )
    assert "18 training images" in report.title
    naive, decode, aug = report.rows
    assert naive.ratio == 1.0 and decode.images_per_s > 0
    assert aug.ratio == pytest.approx(aug.images_per_s / naive.images_per_s)
    assert report.info["resfit pipeline / consumption"] == f"{aug.images_per_s / 10:.1f}x"


def test_cli_bench_pipeline_needs_data(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "pipeline"]) == 2
    assert "needs --data DIR" in capsys.readouterr().err


def test_cli_bench_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_colour_folder(tmp_path / "data", per_class=4, size=40)
    out = tmp_path / "bench.json"
    rc = main(
        ["bench", "pipeline", "--data", str(data), "--img-size", "32", "--batch", "4",
         "--repeats", "1", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    (rep,) = json.loads(out.read_text())
    assert rep["rows"][0]["name"].startswith("naive") and len(rep["rows"]) == 3
    assert "data pipeline" in capsys.readouterr().out


def test_cli_bench_all_without_data_skips_the_pipeline(capsys: pytest.CaptureFixture) -> None:
    rc = main(
        ["bench", "--arch", "resnet20_cifar", "--batch", "4", "--repeats", "1", "--no-onnx",
         "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "needs --data DIR: skipped" in out
    assert "resnet20_cifar inference on cpu" in out and "resnet20_cifar training step" in out
    assert "data pipeline:" not in out  # the table title; the skip note says "pipeline needs"

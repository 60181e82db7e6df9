"""Issue 28: unknown inputs, conformal sets and selective prediction, end to end on a tiny run
(predict CSV, serve JSON, the Python API and the ONNX engine agree) and on synthetic data."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.core.errors import ConfigError
from resfit.inference.conformal import (
    conformal_threshold,
    prediction_sets,
    selective_threshold,
)
from resfit.inference.predictor import Predictor, write_predictions_csv
from resfit.inference.unknown import DEFAULT_SCORE, SCORES, fit_detector

from .images import make_colour_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    import resfit

    data = make_colour_folder(tmp_path_factory.mktemp("data"), per_class=12)
    out = tmp_path_factory.mktemp("runs") / "run"
    resfit.train(data=str(data), out=str(out), arch="resnet20_cifar", img_size=16, epochs=1,
                 progress=False, report=False, leakage="off")  # fmt: skip
    return data, out


@pytest.fixture(scope="module")
def images(run, tmp_path_factory) -> list[Path]:
    """Validation images (known) and noise and grey images (unlike anything trained on)."""
    data, _ = run
    odd = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(odd / f"n{i}.png")
        Image.new("RGB", (24, 24), (40 * i, 40 * i, 40 * i)).save(odd / f"g{i}.png")
    return sorted((data / "val").rglob("*.png")) + sorted(odd.glob("*.png"))


def test_unknown_flags_agree_in_csv_serve_api_and_onnx(run, images) -> None:
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.export.run import export_run

    _, out = run
    record = json.loads((out / "unknown.json").read_text())
    assert record["score"] == DEFAULT_SCORE and record["accept"] == 0.95
    pred = Predictor.from_run(out, engine="torch")
    preds, skipped = pred.predict(images)
    assert not skipped and all(p.unknown is not None for p in preds)
    flags = [p.unknown for p in preds]
    assert any(flags) and not all(flags)  # a threshold that separates something
    for p in preds:  # an unknown image has no label and keeps its best guess
        assert p.label == p.best_guess == p.top_k[0][0]
    rows = list(csv.DictReader(io.StringIO(write_predictions_csv(None, preds, 1))))
    assert [r["unknown"] == "true" for r in rows] == flags
    assert [r["label"] == "" for r in rows] == flags
    assert all(r["best_guess"] for r in rows)
    # The Python API's score is the CSV's, and the threshold splits it the same way.
    decoded = pred.decode(images)
    _, scores = pred.unknown_scores(decoded)
    assert scores is not None
    assert np.allclose(scores.numpy(), [float(r["unknown_score"]) for r in rows], atol=1e-5)
    assert list(scores.numpy() > record["threshold"]) == flags
    # serve: the same flags, label null for unknown, the best guess kept.
    with TestClient(create_app(pred, ServeOptions())) as client:
        for path, flag, s in zip(images, flags, scores.tolist(), strict=True):
            answer = client.post("/v1/predict", content=path.read_bytes()).json()
            assert answer["score"] == pytest.approx(s, abs=1e-4), (path, answer)
            assert answer["unknown"] is flag and isinstance(answer["score"], float)
            assert (answer["label"] is None) == flag
            assert not flag or answer["best_guess"] == answer["top_k"][0][0]
    # The ONNX export keeps the score and threshold; its engine flags the same images.
    export_run(out)
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["unknown"]["threshold"] == record["threshold"]
    onnx_preds, _ = Predictor.from_run(out, engine="onnx").predict(images)
    assert [p.unknown for p in onnx_preds] == flags
    # Real photos too (flowers5, cifar10-jpg; where the shared assets are here), in every
    # engine that runs on this machine: the score reads the run's fp32 features, so the
    # engines' flags and scores are the torch engine's.
    photos = _real_photos(out.parent / "photos") + images
    ref, _ = pred.predict(photos)
    for engine in ("onnx", "openvino"):
        if engine == "openvino" and importlib.util.find_spec("openvino") is None:
            continue
        got, _ = Predictor.from_run(out, engine=engine).predict(photos)
        assert [p.unknown for p in got] == [p.unknown for p in ref], engine
        assert np.allclose([p.unknown_score for p in got], [p.unknown_score for p in ref],
                           rtol=1e-5, atol=1e-5), engine  # fmt: skip


def _real_photos(folder: Path, per_set: int = 4) -> list[Path]:
    """A few flowers5 and cifar10-jpg photos from the shared assets (none without them)."""
    import zipfile

    from .conftest import CIFAR_ZIP, FLOWERS_ZIP

    out = []
    for zip_path in (FLOWERS_ZIP, CIFAR_ZIP):
        if not zip_path.exists():
            continue
        with zipfile.ZipFile(zip_path) as z:
            names = [n for n in z.namelist() if n.endswith(".jpg")][::997][:per_set]
            for n in names:
                path = folder / n.replace("/", "_")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(z.read(n))
                out.append(path)
    return out


def test_a_run_without_the_score_still_predicts_with_a_note(run, images, tmp_path, caplog) -> None:
    _, out = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "unknown.json").unlink()
    (old / "unknown.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="resfit"):
        preds, _ = Predictor.from_run(old, engine="torch").predict(images[:3])
    assert "has no unknown-input score" in caplog.text
    assert preds[0].unknown is None and preds[0].label
    header = write_predictions_csv(None, preds, 1).splitlines()[0]
    assert header == "path,label,confidence"
    with pytest.raises(ConfigError, match="train it again"):
        Predictor.from_run(old, engine="torch", conformal=0.9)


def test_unknown_folder_moves_the_threshold(run, images, caplog) -> None:
    _, out = run
    odd = images[-1].parent
    with caplog.at_level(logging.INFO, logger="resfit"):
        pred = Predictor.from_run(out, engine="torch", unknown_folder=odd, false_accept=0.0)
    assert "AUROC" in caplog.text
    preds, _ = pred.predict(sorted(odd.glob("*.png")))
    assert all(p.unknown for p in preds)  # no false accepts on the folder it was set on
    with pytest.raises(ConfigError, match="--false-accept"):
        Predictor.from_run(out, engine="torch", unknown_folder=odd, false_accept=1.5)


def test_conformal_sets_and_max_risk_through_predict(run, images) -> None:
    _, out = run
    pred = Predictor.from_run(out, engine="torch", conformal=0.9, max_risk=0.5)
    preds, _ = pred.predict(images)
    assert all(p.set and p.set[0] == p.top_k[0][0] for p in preds)
    assert all(p.accepted is not None for p in preds)
    rows = list(csv.DictReader(io.StringIO(write_predictions_csv(None, preds, 1))))
    assert [r["set"].split(";") for r in rows] == [p.set for p in preds]
    # serve's JSON (the batcher's rows): the set as a list, the same as predict's.
    row = pred.scored_probabilities(pred.decode(images[:1]))[0]
    answer = pred.answer_row(row, 3)
    assert answer["set"] == preds[0].set and answer["accepted"] is preds[0].accepted
    assert answer["unknown"] is preds[0].unknown


def test_bad_values_give_clear_errors(run) -> None:
    _, out = run
    with pytest.raises(ConfigError, match="--conformal must be a fraction"):
        Predictor.from_run(out, engine="torch", conformal=90)
    with pytest.raises(ConfigError, match="--max-risk must be a fraction"):
        Predictor.from_run(out, engine="torch", max_risk=0)
    with pytest.raises(ConfigError, match="conformal method"):
        Predictor.from_run(out, engine="torch", conformal=0.9, conformal_method="lac")
    with pytest.raises(ConfigError, match="unknown score"):
        SCORES.get("odin")


def test_multilabel_task_says_sets_are_for_single_label() -> None:
    from resfit.inference.trust import Trust
    from resfit.tasks.multi import MultiLabel

    trust = Trust(None, np.full((4, 2), 0.5, np.float32), np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="single-label runs"):
        trust.configure(MultiLabel(), conformal=0.9)


def _synthetic(
    n: int, rng: np.random.Generator, scale: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of 10 classes and labels drawn from them (a calibrated model)."""
    logits = rng.normal(0, scale, (n, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_conformal_coverage_holds_on_exchangeable_data(method: str) -> None:
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(10):
        probs, labels = _synthetic(2000, rng)
        q = conformal_threshold(probs[:1000], labels[:1000], 0.9, method)
        sets = prediction_sets(probs[1000:], q, method)
        covered.append(np.mean([y in s for y, s in zip(labels[1000:], sets, strict=True)]))
    assert 0.88 <= np.mean(covered) <= 0.93  # at least 0.9 in expectation, and not far above
    assert conformal_threshold(probs[:5], labels[:5], 0.9) == float("inf")  # too few: all


def test_selective_threshold_bounds_the_error() -> None:
    rng = np.random.default_rng(1)
    probs, labels = _synthetic(4000, rng, scale=5.0)  # a model sure of most images
    conf, correct = probs.max(1), probs.argmax(1) == labels
    sel = selective_threshold(conf[:2000], correct[:2000], max_risk=0.05)
    assert 0.0 < sel.accepted < 1.0 and sel.bound <= 0.05
    held = conf[2000:] >= sel.threshold
    assert 1 - correct[2000:][held].mean() <= 0.07
    assert selective_threshold(conf[:50], correct[:50], 0.01).threshold == float("inf")


@pytest.mark.parametrize("name", sorted(SCORES.names()))
def test_every_score_ranks_points_between_the_classes_above_them(name: str) -> None:
    rng = np.random.default_rng(2)
    means = rng.normal(0, 3, (3, 16))
    y = rng.integers(0, 3, 600)
    f = means[y] + rng.normal(0, 0.3, (600, 16))
    w = means / 3
    # Stand-ins for the stages' statistics after the pooled features (multistage reads them;
    # every other score must read the first 16 columns alone, whatever follows).
    with_stats = lambda x: np.concatenate([x, np.abs(x[:, :8]) + x[:, 8:] ** 2], 1)  # noqa: E731
    det = fit_detector(with_stats(f), y, w, np.zeros(3), name)
    near = det.score(with_stats(f[:100]), f[:100] @ w.T)
    # Between the classes, near the origin: no class's cloud, and no confident logit either
    # (which is all that msp, energy and maxlogit see; far out along a class they miss).
    odd = rng.normal(0, 0.3, (100, 16))
    assert np.median(det.score(with_stats(odd), odd @ w.T)) > np.median(near), name
    if not SCORES.get(name).stages:  # the pooled features alone give the same scores
        alone = fit_detector(f, y, w, np.zeros(3), name).score(odd, odd @ w.T)
        assert np.allclose(alone, det.score(with_stats(odd), odd @ w.T)), name


def test_the_option_lists_every_score_once() -> None:
    from resfit.core.config import UNKNOWN_SCORES
    from resfit.inference.unknown import SCORES

    assert len(UNKNOWN_SCORES) == len(set(UNKNOWN_SCORES))
    assert set(UNKNOWN_SCORES) == set(SCORES.names()) | {"none"}


def test_score_features_start_with_the_pooled_features_and_bound_the_statistics() -> None:
    import torch

    from resfit.inference import stagestats
    from resfit.models.adapters import adapt
    from resfit.models.resnet import build_model

    ad = adapt(build_model("resnet20_cifar", num_classes=3).eval())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        f = stagestats.score_features(ad, x)
        assert torch.allclose(f[:, : ad.num_features], ad.features(x), atol=1e-6)
    # stem 16, layer1 16, layer2 32, layer3 64 channels: a mean and a std each
    assert f.shape == (2, 64 + 2 * (16 + 16 + 32 + 64))
    wide = stagestats.channel_stats(torch.randn(2, 300, 1, 1))  # one pixel: std 0, not NaN
    assert wide.shape == (2, 2 * stagestats.MAX_CHANNELS) and torch.isfinite(wide).all()

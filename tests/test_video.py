"""Video input: a real H.264 video written with PyAV from cifar10-jpg photos (airplanes, then
frogs, with single noise frames) through ``resfit predict RUN clip.mp4``: two events with
boundaries within one second of the truth, and the smoothing removes the one-frame flickers
that the per-frame CSV shows; a corrupt video is one error naming the file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

FPS = 10
SWITCH = 4.0  # seconds of airplanes, then as many of frogs


def write_clip(cifar10_root: Path, path: Path, flickers: tuple[int, ...]) -> Path:
    """A clip of 2 * SWITCH seconds: each frame a test photo (airplane, then frog) at 64 px;
    at the frames in ``flickers`` a photo of the other class (a one-frame flicker)."""
    from PIL import Image

    photos = {c: sorted((cifar10_root / "test" / c).glob("*.jpg")) for c in ("airplane", "frog")}
    n = int(2 * SWITCH * FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"}
        for i in range(n):
            cls = "airplane" if i < SWITCH * FPS else "frog"
            if i in flickers:
                cls = "frog" if cls == "airplane" else "airplane"
            img = Image.open(photos[cls][i % 40]).convert("RGB").resize((64, 64))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_predict_video_finds_the_events(airplane_frog_run, cifar10_root, tmp_path, capsys) -> None:
    from resfit.cli import main

    flickers = (12, 25, 52, 66)  # two in each half
    clip = write_clip(cifar10_root, tmp_path / "clip.mp4", flickers)
    out = tmp_path / "frames.csv"
    assert main(["predict", str(airplane_frog_run), str(clip), "--out", str(out),
                 "--smooth", "1"]) == 0  # fmt: skip
    frames = list(csv.DictReader(open(out)))
    assert len(frames) == 2 * SWITCH * FPS
    raw = [r["label"] for r in frames]
    # The per-frame labels flicker (the noise frames, and any photo the model gets wrong) ...
    changes = sum(a != b for a, b in zip(raw, raw[1:], strict=False))
    assert changes >= 5
    # ... the events do not: airplanes, then frogs, switching within a second of the truth.
    events = list(csv.DictReader(open(tmp_path / "frames.events.csv")))
    assert [e["label"] for e in events] == ["airplane", "frog"]
    assert float(events[0]["start"]) == pytest.approx(0.0, abs=0.2)
    assert abs(float(events[0]["end"]) - SWITCH) <= 1.0
    assert abs(float(events[1]["start"]) - SWITCH) <= 1.0
    assert abs(float(events[1]["end"]) - 2 * SWITCH) <= 1.0
    assert all(0.5 < float(e["mean_confidence"]) <= 1 for e in events)
    # --smooth 0 keeps the flickers as events of their own.
    capsys.readouterr()
    assert main(["predict", str(airplane_frog_run), str(clip), "--smooth", "0", "--fps", "5"]) == 0
    plain = [r for r in csv.DictReader(capsys.readouterr().out.splitlines())]
    assert len(plain) > 2


def test_smoothing_by_hand() -> None:
    from resfit.inference.video import events, smooth

    times = np.arange(30) / 10
    probs = np.tile([[0.9, 0.1]], (30, 1))
    probs[15:] = [0.1, 0.9]
    probs[5], probs[22] = [0.2, 0.8], [0.7, 0.3]  # single-frame flickers
    assert smooth(times, probs, 0)[5] == 1
    labels = smooth(times, probs, 0.5)
    # The flickers are gone; the switch lags one frame (at 1.5 s b leads by 0.16 < HYSTERESIS).
    assert labels == [0] * 16 + [1] * 14
    ev = events(times, probs, labels, ["a", "b"])
    assert [(e["label"], e["start"], e["end"]) for e in ev] == [("a", 0.0, 1.6), ("b", 1.6, 3.0)]


def test_corrupt_video_is_one_error(airplane_frog_run, tmp_path) -> None:
    from resfit.core.errors import DataError
    from resfit.inference.predictor import Predictor
    from resfit.inference.video import predict_video

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    with pytest.raises(DataError, match="broken.mp4"):
        predict_video(Predictor.from_run(airplane_frog_run), bad)


def test_serve_predict_video_within_the_limits(airplane_frog_run, cifar10_root, tmp_path) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    clip = write_clip(cifar10_root, tmp_path / "clip.mp4", ()).read_bytes()
    app = create_app(Predictor.from_run(airplane_frog_run), ServeOptions(max_images=20),
                     framework="starlette")  # fmt: skip
    with TestClient(app) as c:
        r = c.post("/v1/predict-video?fps=2&smooth=1", content=clip)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["frames"]) == 2 * SWITCH * 2
        assert [e["label"] for e in body["events"]] == ["airplane", "frog"]
        r = c.post("/v1/predict-video?fps=10", content=clip)  # 80 frames: over --max-images
        assert r.status_code == 413 and "--max-images" in r.json()["error"]
        r = c.post("/v1/predict-video", content=b"not a video at all")
        assert r.status_code == 400 and "video" in r.json()["error"]


def test_prepare_frames_keep_a_video_in_one_split(cifar10_root, tmp_path) -> None:
    from resfit.data.discovery import discover
    from resfit.data.video import extract_frames

    for cls, i in (("airplane", 0), ("airplane", 1), ("frog", 0), ("frog", 1)):
        (tmp_path / "videos" / cls).mkdir(parents=True, exist_ok=True)
        write_clip(cifar10_root, tmp_path / "videos" / cls / f"v{i}.mp4", ())
    manifest = extract_frames(tmp_path / "videos", tmp_path / "frames", fps=2)
    splits = discover(manifest, val_fraction=0.5, seed=0)
    assert len(splits.train) + len(splits.val) == 4 * 16
    video_of = {s.path: s.group for s in splits.train + splits.val}
    assert not {video_of[s.path] for s in splits.train} & {video_of[s.path] for s in splits.val}


def test_video_frames_take_the_predictors_batch_path_with_tta(tmp_path) -> None:
    """Frames are classified as images are: the Predictor's preprocessing, test-time
    augmentation and temperature (a random tiny run, a synthetic clip)."""
    from PIL import Image

    from resfit.data.datasets import DecodedImages
    from resfit.data.decode import resize_shorter, to_tensor
    from resfit.data.video import read_frames
    from resfit.inference.predictor import Predictor
    from resfit.inference.video import predict_video

    from .test_inference import make_run

    rng = np.random.default_rng(0)
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(6):
            img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    run = make_run(tmp_path)
    p = Predictor.from_run(run, engine="torch", device="cpu", precision="fp32", tta=True)
    p.temperature = 2.0
    got = predict_video(p, clip, smooth_seconds=0, batch_size=4).probs
    frames = [to_tensor(resize_shorter(img, p.base_size)) for _, img in read_frames(clip)]
    n = len(frames)
    decoded = DecodedImages(frames, torch.full((n,), -1), [clip] * n, [], p.base_size)
    want = p.probabilities(p.logits(decoded)).numpy()
    assert got.shape == want.shape == (6, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    p.tta = False  # the mirror counts: without it the answers differ
    assert not np.allclose(p.probabilities(p.logits(decoded)).numpy(), want, atol=1e-5)

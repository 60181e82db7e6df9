"""Stream mode, the choice of data mode, per-rank sharding, limits and mid-epoch resume."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import resfit.data.sources as sources
import resfit.training.recipes as recipes
import resfit.training.run as run_module
from resfit.core.config import AugmentConfig, TrainConfig
from resfit.core.errors import ConfigError
from resfit.data.augmentation import train_transform
from resfit.data.datasets import TransformedImages, decode_all
from resfit.data.discovery import discover
from resfit.data.sources import Sharding, Streaming, choose_mode, decoded_bytes
from resfit.training import train
from resfit.training.loop import Callback

from .images import make_colour_folder, write_broken_files

FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=8, progress=False, report=False,
            leakage="off", precision="fp32")  # fmt: skip


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=16)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


# -- stream mode -------------------------------------------------------------------------------


def test_stream_equals_memory_without_random_augmentation(colours: Path, tmp_path: Path) -> None:
    # Same pixels (the same decoder and resize), same batches: the same weights, to fp32.
    runs = {}
    for mode in ("memory", "stream"):
        runs[mode] = tmp_path / mode
        train(data=str(colours), out=str(runs[mode]), data_mode=mode, epochs=2, augment="none",
              **FAST)  # fmt: skip
    _assert_same_weights(runs["memory"], runs["stream"])
    assert "data mode: stream" in (runs["stream"] / "train.log").read_text()


def test_stream_lists_broken_files_found_by_header_and_during_training(
    colours: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    broken = write_broken_files(data / "train" / "red")
    r = train(data=str(data), out=str(tmp_path / "run"), data_mode="stream", epochs=2,
              val_fraction=0.0, augment="light", **FAST)  # fmt: skip
    with open(tmp_path / "run" / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    # empty, not-an-image and bomb are refused by their headers; the truncated JPEG has a good
    # header and fails when a worker decodes it: listed once, though two epochs read it.
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in broken)
    truncated = [r for r in rows if r["path"].endswith("truncated.jpg")]
    assert len(truncated) == 1 and "truncated" in truncated[0]["reason"]
    assert len(r.history) == 2


def test_stream_augmentation_is_fresh_each_epoch_and_the_same_for_any_workers(
    colours: Path,
) -> None:
    samples = discover(colours, val_fraction=0.0).train[:12]
    tf = train_transform(AugmentConfig("standard"), 16, (0.5,) * 3, (0.25,) * 3)
    data = TransformedImages(Streaming().open(samples, 18, progress=False, desc="x"), tf)
    source = Streaming()

    def epoch(seed: int, workers: int) -> torch.Tensor:
        return torch.cat([x for x, _ in source.batches(data, [[0, 1, 2], [3, 4, 5]], workers,
                                                       seed=seed)])  # fmt: skip

    before = torch.get_rng_state()
    first = epoch(7, 0)
    assert torch.equal(torch.get_rng_state(), before), "the caller's random state is left alone"
    assert torch.equal(first, epoch(7, 0))
    assert torch.equal(first, epoch(7, 2)), "workers do not change the augmentation"
    assert not torch.allclose(first, epoch(8, 0)), "another epoch draws new augmentations"
    # A run resumed at step 1 gets the very images the uninterrupted epoch had there.
    resumed = torch.cat([x for x, _ in source.batches(data, [[3, 4, 5]], 0, seed=7,
                                                      first_step=1)])  # fmt: skip
    assert torch.equal(resumed, first[3:])


# -- choosing the mode -------------------------------------------------------------------------


def test_decoded_size_estimate_matches_decoding(colours: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "wide"
    for i in range(20):  # 3:2 photos of two sizes
        (folder / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60 + 30 * (i % 2), 40 + 20 * (i % 2))).save(folder / "a" / f"{i}.jpg")
    samples = discover(colours, val_fraction=0.0).train[:10]
    from resfit.data.samples import Sample

    wide = [Sample(p, 0) for p in sorted((folder / "a").iterdir())]
    for group in (samples, wide):
        pixels = sum(t.numel() for t in decode_all(group, 32, progress=False).images)
        overhead = len(group) * sources._TENSOR_OVERHEAD  # each tensor's own bookkeeping
        assert decoded_bytes(group, 32) == pytest.approx(pixels + overhead, rel=0.05)


def test_auto_picks_memory_with_room_and_stream_without(colours, monkeypatch) -> None:
    splits = discover(colours)
    need = decoded_bytes(splits.train, 40) + decoded_bytes(splits.val, 40)
    monkeypatch.setattr(sources, "available_memory", lambda: need * 3)
    assert choose_mode("auto", splits.train, splits.val, (40, 40)).mode == "memory"
    monkeypatch.setattr(sources, "available_memory", lambda: need * 3 // 2)
    choice = choose_mode("auto", splits.train, splits.val, (40, 40))
    assert choice.mode == "stream" and "more than 50%" in choice.reason
    assert choose_mode("memory", splits.train, splits.val, (40, 40)).mode == "memory"
    # Two ranks on this machine each decode half of train but have half the memory.
    assert choose_mode("auto", splits.train, splits.val, (40, 40), 2, 2).mode == "stream"


def test_memory_mode_refuses_what_will_not_fit_before_decoding(
    colours: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(sources, "available_memory", lambda: 50_000)

    def no_decoding(*a, **k):
        raise AssertionError("decoded before refusing")

    monkeypatch.setattr(sources, "decode_all", no_decoding)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"would take ~0\.0 GB .*--data-mode stream"):
        train(data=str(colours), out=str(tmp_path / "run"), data_mode="memory", epochs=1, **FAST)
    assert time.perf_counter() - t0 < 20
    # auto streams the same data, and says why.
    train(data=str(colours), out=str(tmp_path / "auto"), epochs=1, limit_train_batches=2, **FAST)
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "data mode: stream (auto: decoded images" in log


# -- sharding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 5])
def test_sharding_gives_ranks_disjoint_files_and_the_one_process_batches(n: int) -> None:
    one = Sharding.plan(n, 8, 0, 1, seed=3)
    ranks = [Sharding.plan(n, 8, r, 2, seed=3) for r in range(2)]
    if n >= 8:
        assert not set(ranks[0].ids) & set(ranks[1].ids), "each rank opens its own files"
        assert sorted(ranks[0].ids + ranks[1].ids) == list(range(n))
    for epoch in range(3):
        whole = [[one.ids[i] for i in b] for b in one.epoch(epoch)]
        halves = [[[s.ids[i] for i in b] for b in s.epoch(epoch)] for s in ranks]
        assert whole == [a + b for a, b in zip(*halves, strict=True)]
        assert len(whole) == max(1, n // 8)
        assert all(len(set(b)) == len(b) for b in whole) or n < 8
    if n >= 8:  # (a split smaller than a batch is that one batch every epoch)
        assert one.epoch(0) != one.epoch(1), "each epoch reshuffles"


def test_two_ranks_in_stream_mode_read_disjoint_files(colours: Path, monkeypatch) -> None:
    """Two ranks' worth of opening and two epochs of batches: each file read by one rank."""
    splits = discover(colours, val_fraction=0.0)
    read: dict[int, set[str]] = {0: set(), 1: set()}
    real_load = sources.load_image
    rank = 0

    def load(path, max_side=None, **kw):
        read[rank].add(str(path))
        return real_load(path, max_side, **kw)

    monkeypatch.setattr(sources, "load_image", load)
    tf = train_transform(AugmentConfig("light"), 16, (0.5,) * 3, (0.25,) * 3)
    for rank in (0, 1):
        sharding = Sharding.plan(len(splits.train), 8, rank, 2, seed=0)
        share = [splits.train[i] for i in sharding.ids]
        data = TransformedImages(Streaming().open(share, 18, progress=False, desc="x"), tf)
        for epoch in range(2):
            for _ in Streaming().batches(data, sharding.epoch(epoch), 0, seed=epoch):
                pass
    assert read[0] and read[1] and not read[0] & read[1]


# -- limits and resume -------------------------------------------------------------------------


class _Count(Callback):
    def __init__(self) -> None:
        self.steps, self.val = 0, []

    def after_step(self, loop) -> None:
        self.steps += 1

    def after_epoch(self, loop) -> None:
        self.val.append(len(loop.data.val))


def test_limits_cap_the_batches_of_an_epoch_and_of_validation(tmp_path: Path, monkeypatch) -> None:
    data = make_colour_folder(tmp_path / "data", per_class=40)  # 120 train, 120 val
    count, real = _Count(), recipes.callbacks_for
    monkeypatch.setattr(run_module, "callbacks_for", lambda *a: real(*a) + [count])
    opts = {**FAST, "batch_size": 4}
    train(data=str(data), out=str(tmp_path / "run"), epochs=2, limit_train_batches=3,
          limit_val_batches=1, **opts)  # fmt: skip
    assert count.steps == 2 * 3
    assert count.val == [64, 64], "one validation batch (64 images)"
    with pytest.raises(ConfigError, match="--limit-train-batches"):
        TrainConfig.from_options(data="x", limit_train_batches=0).check()


class _Kill(Callback):
    """Stops the run as a SIGKILL would, after ``at`` steps (the checkpoint of that step is
    written: Checkpoint runs first)."""

    order = 99

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def after_step(self, loop) -> None:
        self.steps += 1
        if self.steps == self.at:
            raise KeyboardInterrupt


def test_killed_stream_run_resumes_mid_epoch_with_the_same_weights(
    colours: Path, tmp_path: Path, monkeypatch
) -> None:
    opts = dict(data=str(colours), data_mode="stream", epochs=2, augment="standard",
                checkpoint_every=1, seed=5, **FAST)  # fmt: skip
    train(out=str(tmp_path / "whole"), **opts)
    steps = len(discover(colours, seed=5).train) // 8  # batches per epoch
    real = recipes.callbacks_for
    monkeypatch.setattr(run_module, "callbacks_for", lambda *a: real(*a) + [_Kill(steps + 2)])
    with pytest.raises(KeyboardInterrupt):
        train(out=str(tmp_path / "killed"), **opts)
    ck = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["progress"]["step"] == 2, "killed in the middle of epoch 2"
    monkeypatch.setattr(run_module, "callbacks_for", real)
    train(out=str(tmp_path / "killed"), resume=True)
    _assert_same_weights(tmp_path / "whole", tmp_path / "killed")
    log = (tmp_path / "killed" / "train.log").read_text()
    assert "at step 2 of epoch 2" in log


def test_bench_sources_times_each_mode_and_worker_count(colours: Path) -> None:
    from resfit.apps.benchmark.pipeline import bench_sources

    report = bench_sources(colours, img_size=16, limit=24, batch=8, epochs=1, workers=(1,),
                           consumer_images_per_s=10.0)  # fmt: skip
    import importlib.util

    shards = importlib.util.find_spec("litdata") is not None
    modes = ("stream", "shards", "memory") if shards else ("stream", "memory")
    assert [r.name for r in report.rows] == [f"{m}, 1 worker(s)" for m in modes]
    assert not shards or "images/s, once" in report.info["resfit prepare"]
    for r in report.rows:
        assert r.images_per_s > 0 and "peak PSS" in r.note and "x the step" in r.note

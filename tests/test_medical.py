"""DICOM input on real pixel data: files made from cifar10-jpg photos (16-bit, rescale slope and
intercept, window tags, MONOCHROME1 and 2) decode to the photo's grey values, train/eval/predict
as well as the PNG originals; --window for DICOM and 16-bit PNG; and the bad inputs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pydicom")

from resfit.core.config import TrainConfig  # noqa: E402
from resfit.core.errors import ConfigError  # noqa: E402
from resfit.core.windows import parse_window  # noqa: E402
from resfit.data.decode import DecodeError, load_image  # noqa: E402

from .dicoms import photo_as_dicom, write_dicom  # noqa: E402

CLASSES = ("airplane", "frog")
FAST = dict(arch="resnet20_cifar", img_size=32, batch_size=32, progress=False, augment="none",
            epochs=3, report=False, leakage="off", precise_bn=0)  # fmt: skip


def _grey_pairs(cifar10_root: Path, out: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """The same photos as grey PNGs and as DICOM files (half MONOCHROME1): two data roots."""
    png, dcm = out / "png", out / "dcm"
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            photos = sorted((cifar10_root / split / cls).glob("*.jpg"))[:n]
            for d in (png / split / cls, dcm / split / cls):
                d.mkdir(parents=True)
            for i, p in enumerate(photos):
                Image.open(p).convert("L").save(png / split / cls / f"{p.stem}.png")
                photo_as_dicom(p, dcm / split / cls / f"{p.stem}.dcm", monochrome1=i % 2 == 1,
                               tags={"PatientID": f"P{i}", "Manufacturer": "AB"[i % 2]})  # fmt: skip
    return png, dcm


def _odd(dcm: Path) -> set[str]:
    """The stems of the test files _grey_pairs made with Manufacturer B (odd positions)."""
    return {p.stem for c in CLASSES for p in sorted((dcm / "test" / c).glob("*.dcm"))[1::2]}


def test_dicom_decodes_to_the_photo(cifar10_root: Path, tmp_path: Path) -> None:
    photo = sorted((cifar10_root / "test" / "cat").glob("*.jpg"))[0]
    grey = np.asarray(Image.open(photo).convert("L"), dtype=int)
    for mono1 in (False, True):
        d = photo_as_dicom(photo, tmp_path / f"m{int(mono1)}.dcm", monochrome1=mono1)
        seen = np.asarray(load_image(d), dtype=np.float32) * 255  # float grey in [0, 1]
        assert seen.shape == grey.shape
        assert np.abs(seen - grey).max() <= 1  # rescale, window and inversion applied


def test_dicom_trains_evaluates_and_predicts_like_png(cifar10_root: Path, tmp_path: Path) -> None:
    from resfit.inference.predictor import Predictor
    from resfit.insight.evaluation import evaluate
    from resfit.training import train

    png, dcm = _grey_pairs(cifar10_root, tmp_path, n_train=120, n_test=40)
    scores = {}
    for name, root in (("png", png), ("dcm", dcm)):
        run = tmp_path / f"run-{name}"
        # The data root: val carved from train/, test/ scored by training (per Manufacturer).
        train(TrainConfig.from_options(data=str(root), out=str(run), slice_by="Manufacturer",
                                       **FAST))  # fmt: skip
        scores[name] = evaluate(run, root / "test").accuracy
    assert scores["png"] > 0.6  # it learned something from these photos
    assert abs(scores["png"] - scores["dcm"]) <= 0.05, scores
    # --slice-by writes slices.csv for every evaluated split (PNGs carry no tag: a warning).
    evaluated = tmp_path / "run-dcm" / "eval-test"
    preds = list(csv.DictReader(open(evaluated / "predictions.csv")))
    slices = list(csv.DictReader(open(evaluated / "slices.csv")))
    assert (tmp_path / "run-dcm" / "eval-val" / "slices.csv").is_file()
    assert not (tmp_path / "run-png" / "eval-test" / "slices.csv").exists()
    maker = {r["path"]: "AB"[int(Path(r["path"]).stem in _odd(dcm))] for r in preds}
    for row in slices:
        mine = [int(r["correct"]) for r in preds if maker[r["path"]] == row["Manufacturer"]]
        assert int(row["n"]) == len(mine) == 40
        assert float(row["accuracy"]) == pytest.approx(np.mean(mine), abs=1e-6)
    preds, skipped = Predictor.from_run(tmp_path / "run-dcm").predict([dcm / "test"])
    assert not skipped and len(preds) == 2 * 40
    hits = [p.label == Path(p.path).parent.name for p in preds]
    assert abs(np.mean(hits) - scores["dcm"]) < 1e-9


def test_window_option_for_dicom_and_16bit_png(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (8, 1))  # 0..3990
    d = write_dicom(tmp_path / "ramp.dcm", ramp, window=(2000.0, 4000.0))
    p = tmp_path / "ramp.png"
    Image.fromarray(ramp.astype(np.uint16)).save(p)
    own = np.asarray(load_image(d))[0]
    assert own[0] == 0 and abs(own[-1] - 3990 / 4000) < 1e-6  # the file's window: the ramp
    narrow_window = parse_window("1000,200")  # values 900..1100 spread over 0..1
    for f in (d, p):
        narrow = np.asarray(load_image(f, window=narrow_window))[0]
        assert narrow[ramp[0] <= 900].max() == 0 and narrow[ramp[0] >= 1100].min() == 1
        assert len(np.unique(narrow[(ramp[0] > 900) & (ramp[0] < 1100)])) == 19  # every step
    assert np.asarray(load_image(d, window=parse_window("brain")))[0, 9] == 1  # 40 +/- 40
    with pytest.raises(ConfigError, match="--window"):
        TrainConfig.from_options(data="x", window="wide").check()


def test_dicom_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    ramp = np.zeros((4, 4), np.uint16)
    empty = write_dicom(tmp_path / "nopixels.dcm", ramp, pixels=False)
    with pytest.raises(DecodeError, match="without pixel data"):
        load_image(empty)
    jpeg = write_dicom(tmp_path / "jpeg.dcm", ramp, syntax="1.2.840.10008.1.2.4.80")  # JPEG-LS
    with pytest.raises(DecodeError, match="pip install pylibjpeg"):
        load_image(jpeg)


def test_no_patient_data_in_the_splits_or_errors(cifar10_root: Path, tmp_path: Path) -> None:
    """The splits file and a skip reason carry paths and group ids, never a patient's name."""
    from resfit.data.discovery import discover, write_splits

    _, dcm = _grey_pairs(cifar10_root, tmp_path, n_train=6, n_test=1)
    splits = discover(dcm / "train", val_fraction=0.34)
    write_splits(tmp_path / "splits.csv", splits)
    text = (tmp_path / "splits.csv").read_text()
    assert "Test^Person" not in text
    rows = list(csv.DictReader(text.splitlines()))
    assert {r["group"] for r in rows} == {f"P{i}" for i in range(6)}


def test_serve_takes_a_dicom_body(airplane_frog_run, cifar10_root, tmp_path) -> None:
    """A DICOM upload is decoded as the file is (predict's label); a broken one is a 4xx."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    photo = sorted((cifar10_root / "test" / "frog").glob("*.jpg"))[0]
    d = photo_as_dicom(photo, tmp_path / "frog.dcm", monochrome1=True)
    predictor = Predictor.from_run(airplane_frog_run)
    offline = predictor.predict([d])[0][0]
    with TestClient(create_app(predictor, ServeOptions(), framework="starlette")) as c:
        r = c.post("/v1/predict", content=d.read_bytes())
        assert r.status_code == 200
        answer = r.json()  # an image the run finds unknown keeps its class as the best guess
        assert answer["unknown"] == offline.unknown
        assert (answer["label"] or answer["best_guess"]) == offline.label
        r = c.post("/v1/predict", content=d.read_bytes()[:200])
        assert 400 <= r.status_code < 500


def _gradient_png(path: Path) -> Path:
    """A 64x64 16-bit PNG whose 4,096 pixels each have their own value (0..4095)."""
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(path)
    return path


def _predictor(window: str | None):
    import torch

    from resfit.inference.predictor import Predictor

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 32, 32))
    return Predictor(model, ["a", "b"], img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                     window=window, device="cpu", engine="torch")  # fmt: skip


def test_two_windows_in_one_process_do_not_interfere(tmp_path: Path) -> None:
    """The window is each predictor's value (from its run's config.json), no process state:
    two runs with their own windows, used in alternation, each decode through their own."""
    ramp = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (8, 1))
    d = write_dicom(tmp_path / "ramp.dcm", ramp, window=(2000.0, 4000.0))
    narrow, wide = _predictor("1000,200"), _predictor("2000,4000")
    assert narrow.window == (1000.0, 200.0) and wide.window == (2000.0, 4000.0)
    first = {}
    for _ in range(2):
        for name, p in (("narrow", narrow), ("wide", wide)):
            img = p.decode([d]).images[0]
            assert first.setdefault(name, img).equal(img)  # the same every time
    # 900..1100 spread over 0..1 in one, the whole ramp in the other.
    assert (first["narrow"] == 1).float().mean() > 0.6 > (first["wide"] == 1).float().mean()


def test_windowed_values_reach_the_model_at_full_precision(tmp_path: Path) -> None:
    """A window wider than 256 raw levels keeps them: the model's input tensor has far more
    than the 256 values an 8-bit step would leave (predict, serve and training's decoding)."""
    import torch

    from resfit.apps.serving.batching import decode_image_bytes
    from resfit.data.samples import Sample
    from resfit.data.sources import Streaming

    png = _gradient_png(tmp_path / "gradient.png")
    p = _predictor("2048,4096")
    x = p.decode([png], ready=True).images[0]  # resized to 32 px, cropped, normalised
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert len(x[0].unique()) > 800  # 1,024 pixels, each its own value (8 bits: at most 256)
    served = p.transform(decode_image_bytes(png.read_bytes(), p.base_size, window=p.window))
    assert served.equal(x)  # serve decodes as predict does
    opened = Streaming(window=p.window).open([Sample(png, 0)], 32, progress=False, desc="x")
    assert opened.item(0)[0].dtype == torch.float32 and len(opened.item(0)[0].unique()) > 800
    Image.new("RGB", (40, 40), (9, 99, 199)).save(tmp_path / "photo.jpg")
    assert p.decode([tmp_path / "photo.jpg"]).images[0].dtype == torch.uint8  # photos: 8 bits


def test_shards_record_the_window(tmp_path: Path) -> None:
    """prepare stores DICOM files through --window and records it; a run on the shards takes
    it, and another --window is one error naming the recorded one."""
    pytest.importorskip("litdata")
    from resfit.data.shards import ShardImages, prepare, read_index, read_splits, shard_window

    ramp = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (40, 1))[:, :40] * 25  # 0..9750
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(3):
            write_dicom(tmp_path / "d" / cls / f"{i}.dcm", ramp, window=(5000.0, 10000.0))
    out = tmp_path / "shards"
    prepare(tmp_path / "d", out, img_size=32, workers=1, progress=False, window="500,1000",
            val_fraction=0.34)  # fmt: skip
    assert read_index(out)["window"] == "500,1000"
    assert shard_window(out, None) == "500,1000" == shard_window(out, "500, 1000")
    with pytest.raises(ConfigError, match="prepared with --window 500,1000"):
        shard_window(out, "lung")
    from resfit.training.setup import resolve

    cfg = TrainConfig.from_options(data=str(out), arch="resnet20_cifar", img_size=32)
    assert resolve(cfg, read_splits(out))[0].data.window == "500,1000"  # config.json's window
    first = read_splits(out).train[0]
    img = ShardImages(out, "train", [first.index], 32)[0]
    # The stored pixels are windowed: 0..1000 of the ramp (its first 4 columns) black to white.
    assert img.dtype == torch.float32  # the file's own window: 0.2 at column 8
    assert img[0, 0, 0] < 40 / 255 and img[0, 0, 8:].min() > 235 / 255
    # ...at 16-bit precision: what decoding the original file gives, not rounded to 8 bits.
    from resfit.data.decode import resize_shorter, to_tensor

    base = read_index(out)["base_size"]
    decoded = load_image(first.path, window=parse_window("500,1000"))
    direct = to_tensor(resize_shorter(resize_shorter(decoded, base), 32))
    assert (img - direct).abs().max() < 1e-4
    assert (torch.round(direct * 255) / 255 - direct).abs().max() > 5e-4  # 8 bits would fail


def test_audit_decodes_dicoms_through_its_window(tmp_path: Path, monkeypatch) -> None:
    """`resfit audit --window`: the audit decodes through the window it is given, and says which
    one in audit.json."""
    import json

    from resfit.apps.audit import audit
    from resfit.data import datasets

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            values = rng.integers(0, 4000, (24, 24)).astype(np.uint16)
            write_dicom(tmp_path / "data" / cls / f"{i}.dcm", values)
    seen = []
    real = datasets.decode_all
    monkeypatch.setattr(datasets, "decode_all",
                        lambda *a, **kw: seen.append(kw.get("window")) or real(*a, **kw))  # fmt: skip
    res = audit(tmp_path / "data", tmp_path / "out", arch="resnet20_cifar", weights=None,
                img_size=16, folds=2, progress=False, window="lung", max_distance=-1)  # fmt: skip
    assert seen == [parse_window("lung")] and seen[0] is not None
    assert json.loads(res.files["json"].read_text())["window"] == "lung"


def test_memory_estimate_counts_what_a_grey_dicom_takes_decoded(tmp_path: Path) -> None:
    """--data-mode auto's estimate reads a DICOM's size from its header and counts the float32
    plane it is kept as (4 bytes a pixel), as decoding it then takes."""
    from resfit.data.datasets import decode_all
    from resfit.data.samples import Sample
    from resfit.data.sources import _TENSOR_OVERHEAD, decoded_bytes

    paths = [write_dicom(tmp_path / f"{i}.dcm", np.full((40, 60), 100 * i, np.uint16))
             for i in range(3)]  # fmt: skip
    samples = [Sample(p, 0) for p in paths]
    assert decoded_bytes(samples, 32) == 3 * (4 * 32 * 48 + _TENSOR_OVERHEAD)
    decoded = decode_all(samples, 32, progress=False)
    assert all(im.untyped_storage().nbytes() == 4 * 32 * 48 for im in decoded.images)

"""Predict and evaluate with a run's own preprocessing (the weights' resize and filter), and
without losing a row to a file name that is not valid UTF-8 (issue 13, defects 1 and 5).

The runs here are made by hand (config.json, classes.json, random resnet20_cifar weights):
these tests are about preprocessing and output, not accuracy, so they need no training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from resfit.data.augmentation import eval_transform
from resfit.data.preprocessing import base_size_for
from resfit.inference.predictor import Predictor, write_predictions_csv
from resfit.insight.evaluation import evaluate

from .images import colour_image, make_colour_folder

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CLASSES = ["blue", "green", "red"]
ODD = b"caf\xe9.png"  # Latin-1 bytes: not valid UTF-8


def make_run(root: Path, *, img_size: int = 16, seed: int = 0, **extra: object) -> Path:
    """A finished run folder with a randomly initialised resnet20_cifar and a flat config."""
    from safetensors.torch import save_file

    from resfit.models.resnet import build_model

    run = root / "run"
    run.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model("resnet20_cifar", num_classes=len(CLASSES))
    save_file(model.state_dict(), str(run / "model.safetensors"))
    (run / "classes.json").write_text(json.dumps(CLASSES))
    cfg = {"arch": "resnet20_cifar", "img_size": img_size, "mean": MEAN, "std": STD, **extra}
    (run / "config.json").write_text(json.dumps(cfg))
    return run


def odd_name(folder: Path, raw: bytes = ODD) -> Path:
    """``folder``/``raw`` as Python holds a name that is not UTF-8 (surrogate escapes)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + raw))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Defect 1: a file name that is not valid UTF-8


@pytest.fixture()
def odd_folder(tmp_path: Path) -> Path:
    folder = make_colour_folder(tmp_path / "data", per_class=2, splits=("",))
    colour_image((40, 60, 200), np.random.default_rng(3)).save(odd_name(folder / "blue"))
    return folder


def test_predictions_csv_keeps_every_row_and_the_odd_name(tmp_path, odd_folder) -> None:
    run = make_run(tmp_path)
    preds, skipped = Predictor.from_run(run, precision="fp32").predict([odd_folder])
    assert len(preds) == 7 and not skipped
    out = tmp_path / "pred.csv"
    write_predictions_csv(out, preds, top_k=1)
    rows = read_rows(out)
    assert len(rows) == 7
    assert ODD in out.read_bytes()  # the name's own bytes, as on disk
    assert sum(Path(r["path"]).is_file() for r in rows) == 7  # every row finds its file again
    assert out.read_bytes().replace(ODD, b"").decode("utf-8")  # the rest is plain UTF-8


def test_cli_predict_writes_a_row_for_every_image(tmp_path, odd_folder) -> None:
    run, out = make_run(tmp_path), tmp_path / "pred.csv"
    r = subprocess.run(
        [sys.executable, "-m", "resfit", "predict", str(run), str(odd_folder), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
    )
    assert r.returncode == 0, r.stderr
    assert len(read_rows(out)) == 7


def test_eval_writes_the_odd_names_in_predictions_and_skipped(tmp_path, odd_folder) -> None:
    run = make_run(tmp_path)
    odd_name(odd_folder / "red", b"d\xe9fectueux.png").write_bytes(b"not an image")
    res = evaluate(run, odd_folder, out=tmp_path / "eval", precision="fp32", report=False)
    assert res.n == 7 and len(res.skipped) == 1
    rows = read_rows(tmp_path / "eval" / "predictions.csv")
    assert len(rows) == 7 and sum(Path(r["path"]).is_file() for r in rows) == 7
    assert any(r["path"].endswith(os.fsdecode(ODD)) and r["true"] == "blue" for r in rows)
    (broken,) = read_rows(tmp_path / "eval" / "skipped.csv")
    assert Path(broken["path"]).read_bytes() == b"not an image"


# ---------------------------------------------------------------------------------------------
# Defect 5: the weights' resize size and filter


def _reference(img: torch.Tensor, resize: int, crop: int, mode: v2.InterpolationMode):
    return v2.Compose(
        [
            v2.Resize(resize, mode, antialias=True),
            v2.CenterCrop(crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(MEAN), list(STD)),
        ]
    )(img)


def test_eval_transform_resizes_with_the_weights_filter() -> None:
    # A small V2-like recipe: resize 64 (bicubic), crop 56, as 232 -> 224 is for ResNet-50.
    img = torch.randint(0, 256, (3, 100, 80), dtype=torch.uint8)
    got = eval_transform(56, MEAN, STD, resize_size=64, interpolation="bicubic")(img)
    bicubic = _reference(img, 64, 56, v2.InterpolationMode.BICUBIC)
    bilinear = _reference(img, 64, 56, v2.InterpolationMode.BILINEAR)
    assert got.shape == (3, 56, 56)
    torch.testing.assert_close(got, bicubic, rtol=0, atol=0)
    assert (got - bilinear).abs().max() > 0.05  # the filter is used, not only the size
    from resfit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="interpolation"):
        eval_transform(56, MEAN, STD, resize_size=64, interpolation="cubic-ish")


def test_predictor_reads_resize_size_and_interpolation_from_the_run(tmp_path) -> None:
    run = make_run(tmp_path, img_size=56, resize_size=64, interpolation="bicubic")
    p = Predictor.from_run(run, precision="fp32")
    assert p.base_size == 64  # decoded at the weights' resize size, not 56 / 0.875
    img = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    torch.testing.assert_close(
        p.transform(img), _reference(img, 64, 56, v2.InterpolationMode.BICUBIC)
    )


def test_predictions_follow_the_torchvision_recipe_end_to_end(tmp_path) -> None:
    """A 100 x 80 photo through Predictor gives the logits of torchvision's own pipeline
    (PIL resize of the shorter side to 64, centre crop 56) on the run's model."""
    run = make_run(tmp_path, img_size=56, resize_size=64, interpolation="bilinear")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(photo)
    p = Predictor.from_run(run, device="cpu", precision="fp32")
    got = p.logits(p.decode([photo]))
    x = v2.Compose(
        [
            v2.Resize(64, v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(56),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(MEAN), list(STD)),
        ]
    )(Image.open(photo).convert("RGB"))
    with torch.no_grad():
        want = p.model(x[None])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_runs_without_resize_size_keep_their_preprocessing(tmp_path) -> None:
    from resfit.data.preprocessing import EvalPreprocessing

    p = Predictor.from_run(make_run(tmp_path, img_size=80), precision="fp32")
    assert p.base_size == base_size_for(80) == 91
    # No resize step (the crop comes first): the images are taken as decoded at 91 px.
    assert type(p.transform).__name__ == "EvalTransform" and p.transform.shorter is None
    pre = EvalPreprocessing.from_config({"img_size": 80, "mean": MEAN, "std": STD})
    assert pre.resize_size is None and pre.interpolation == "bilinear"


def test_a_bad_interpolation_in_config_json_names_the_file(tmp_path) -> None:
    from resfit.core.errors import RunError

    run = make_run(tmp_path, img_size=32, resize_size=36, interpolation="sharpest")
    with pytest.raises(RunError, match=r"config\.json: interpolation must be one of"):
        Predictor.from_run(run)

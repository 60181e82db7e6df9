"""The eval preprocessing without torchvision (issue 18, start-up): bit for bit what
torchvision's Resize/CenterCrop/ToDtype/Normalize give, on real photos, and the predict path
no longer imports torchvision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resfit.data.augmentation import INTERPOLATIONS, eval_transform
from resfit.data.decode import load_image, resize_shorter, to_tensor
from resfit.data.preprocessing import (
    INTERPOLATION_NAMES,
    EvalPreprocessing,
    EvalTransform,
    for_channels,
)

SRC = Path(__file__).resolve().parents[1] / "src"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (img_size, resize_size, interpolation): ImageNet's 256-for-224, torchvision V2 weights' 232,
# a bicubic recipe, CIFAR's whole 32 px, and an odd size whose crop offsets round (.5 cases).
CONFIGS = [(224, None, "bilinear"), (224, 232, "bilinear"), (224, 256, "bicubic"),
           (32, None, "bilinear"), (97, 131, "bilinear")]  # fmt: skip


@pytest.fixture(scope="module")
def photos(flowers_root: Path) -> list[Path]:
    files = sorted(flowers_root.rglob("*.jpg"))
    return files[:: max(1, len(files) // 24)][:24]


@pytest.mark.shared
@pytest.mark.parametrize(("img_size", "resize", "interpolation"), CONFIGS)
def test_equal_to_torchvision_on_real_photos(
    photos: list[Path], img_size: int, resize: int | None, interpolation: str
) -> None:
    pre = EvalPreprocessing(img_size, MEAN, STD, resize_size=resize, interpolation=interpolation)
    ours = pre.eval_transform()
    theirs = eval_transform(img_size, MEAN, STD, resize_size=resize, interpolation=interpolation)
    for path in photos:
        img = load_image(path)
        # As predict decodes (shorter side at the decode size), and as decoded elsewhere: an
        # image one pixel off the decode size goes through torchvision's resize, still equal.
        for side in (pre.decode_size, pre.decode_size + 1):
            x = to_tensor(resize_shorter(img, side))
            a, b = ours(x), theirs(x)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            assert torch.equal(a, b), f"{path.name} at {side} px"


def test_equal_on_odd_shapes_and_one_channel() -> None:
    g = torch.Generator().manual_seed(0)
    tf = EvalTransform(24, MEAN, STD)
    ref = eval_transform(24, MEAN, STD)
    # Odd margins (crop offsets that round), a crop as large as the image, one smaller (padded).
    for h, w in [(25, 40), (24, 24), (31, 27), (20, 30)]:
        x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        assert torch.equal(tf(x), ref(x)), (h, w)
    grey = for_channels(EvalTransform(24, (0.5,), (0.25,)), 1)
    grey_ref = for_channels(eval_transform(24, (0.5,), (0.25,)), 1)
    x = torch.randint(0, 256, (3, 30, 33), dtype=torch.uint8, generator=g)
    assert grey(x).shape == (1, 24, 24) and torch.equal(grey(x), grey_ref(x))


def test_filter_names_are_torchvisions() -> None:
    assert set(INTERPOLATION_NAMES) == set(INTERPOLATIONS)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        EvalPreprocessing(224, MEAN, STD, interpolation="sinc")


def test_the_predict_path_does_not_import_torchvision() -> None:
    code = ("import sys, resfit.inference.predictor, resfit.inference.engines, resfit.cli, resfit.inference.openvino, "
            "resfit.inference.tensorrt; "
            "sys.exit(int('torchvision' in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(SRC)),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, "importing the predict path imported torchvision"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    from resfit.training import train

    from .images import make_colour_folder

    data = make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=6)
    out = tmp_path_factory.mktemp("runs") / "run"
    train(data=str(data), out=str(out), arch="resnet20_cifar", img_size=16, epochs=1,
          batch_size=16, progress=False, report=False, leakage="off")  # fmt: skip
    return out, data


def test_predict_preprocessing_in_the_decode_threads_gives_the_same_answers(
    tiny_run: tuple[Path, Path],
) -> None:
    from resfit.inference.predictor import Predictor

    run, data = tiny_run
    p = Predictor.from_run(run, engine="torch", precision="fp32", device="cpu")
    paths = sorted(data.rglob("*.png"))
    preds, _ = p.predict(paths, batch_size=5)  # crop and normalise in the decode threads
    before = p.probabilities(p.logits(p.decode(paths), batch_size=5))  # on the main thread
    assert [x.path for x in preds] == [str(x) for x in paths]
    assert [x.confidence for x in preds] == before.max(1).values.tolist()


def test_predict_exits_at_once_with_its_outputs_complete(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = tiny_run
    n = len(list(data.rglob("*.png")))
    env = dict(os.environ, PYTHONPATH=str(SRC))
    cmd = [sys.executable, "-m", "resfit", "predict", str(run), str(data), "--engine", "torch"]
    out = tmp_path / "p.csv"
    done = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {n} predictions" in done.stdout
    assert len(out.read_text().splitlines()) == n + 1
    # To a pipe: every row arrives before the process ends without its teardown.
    done = subprocess.run([*cmd, "--top-k", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == n + 1 and lines[0].startswith("path,label,confidence,label_2")
    # A user error still ends in its one line, and exit status 2.
    bad = subprocess.run([*cmd[:4], str(tmp_path / "no-run"), str(data)], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("resfit predict: error:")

"""The weights registry, verified downloads from a local mirror, and safe loading."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import decode_jpeg

import resfit
from resfit.core.errors import WeightsError
from resfit.models.weights import download_weights, get_weights, load_state_dict_file

from .conftest import CIFAR_CKPTS, CIFAR_ZIP, need
from .images import make_colour_folder


def test_registry_takes_imagenet_entries_from_torchvision_metadata() -> None:
    for depth in (18, 34, 50, 101, 152):
        tv_enum = torchvision.models.get_model_weights(f"resnet{depth}")
        for w in tv_enum:
            spec = get_weights(f"resnet{depth}.{w.name.lower()}")
            assert spec.url == w.url
            assert spec.url.endswith(f"-{spec.sha256}.pth")
            assert spec.categories == tuple(w.meta["categories"])
            assert spec.metrics["top1"] == w.meta["_metrics"]["ImageNet-1K"]["acc@1"]
            assert spec.resize_size == w.transforms().resize_size[0]
        assert get_weights("pretrained", arch=f"resnet{depth}").name.endswith(
            tv_enum.DEFAULT.name.lower()
        )
    assert get_weights("ResNet50_Weights.IMAGENET1K_V2").name == "resnet50.imagenet1k_v2"


def test_registry_lists_the_four_cifar_checkpoints() -> None:
    names = [n for n in resfit.list_weights() if n.endswith(".cifar10")]
    assert names == [f"resnet{d}_cifar.cifar10" for d in (20, 32, 44, 56)]
    spec = get_weights("resnet56_cifar.cifar10")
    assert spec.filename == "resnet56-4bfd9763.th" and len(spec.sha256) == 64
    assert spec.metrics["top1"] == pytest.approx(93.39)


# Published by the reference implementation on the 10,000 lossy JPEG test images.
REFERENCE_TOP1 = {20: 81.03, 32: 82.56, 44: 82.67, 56: 83.20}
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}


@pytest.fixture(scope="module")
def cifar_test_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    need(CIFAR_ZIP)
    images, labels = [], []
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.startswith("test/") and n.endswith(".jpg"))
        classes = sorted({n.split("/")[1] for n in names})
        for n in names:
            data = torch.frombuffer(bytearray(z.read(n)), dtype=torch.uint8)
            images.append(decode_jpeg(data))
            labels.append(classes.index(n.split("/")[1]))
    assert len(images) == 10_000
    return torch.stack(images), torch.tensor(labels)


# Every checkpoint on all 10,000 photos to the published figure is `make test-slow`; the default
# run checks the cheapest one so, and the others on every fifth photo (200 of each class: the
# names sort by class), within 2.5 points: 3 standard errors of a 2,000-photo sample.
EVERY_PHOTO = [(20, 1, 0.05)] + [
    pytest.param(d, 1, 0.05, marks=pytest.mark.slow, id=f"{d}-all") for d in (32, 44, 56)
]
EVERY_FIFTH = [(d, 5, 2.5) for d in (32, 44, 56)]


@pytest.mark.parametrize(("depth", "step", "tolerance"), EVERY_PHOTO + EVERY_FIFTH)
def test_cifar_checkpoint_from_mirror_scores_the_reference_accuracy(
    depth: int, step: int, tolerance: float, cifar_mirror: Path, cifar_test_tensors
) -> None:
    images, labels = cifar_test_tensors
    images, labels = images[::step], labels[::step]
    model = resfit.create_model(f"resnet{depth}_cifar", weights="pretrained", progress=False)
    assert (
        cifar_mirror / "weights" / get_weights(f"resnet{depth}_cifar.cifar10").filename
    ).exists()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[depth]
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), 1000):
            x = (images[i : i + 1000].float() / 255 - mean) / std
            correct += (model(x).argmax(1) == labels[i : i + 1000]).sum().item()
    assert len(images) == 10_000 // step
    assert 100 * correct / len(images) == pytest.approx(REFERENCE_TOP1[depth], abs=tolerance)


def test_download_with_wrong_hash_fails_and_leaves_the_cache_clean(
    file_server, tmp_path: Path, monkeypatch
) -> None:
    spec = get_weights("resnet20_cifar.cifar10")
    served = tmp_path / "served"
    served.mkdir()
    (served / spec.filename).write_bytes(b"not the published checkpoint" * 1000)
    monkeypatch.setenv("RESFIT_WEIGHTS_MIRROR", file_server(served))
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="does not match the expected"):
        download_weights(spec, progress=False)
    leftovers = list((tmp_path / "cache").rglob("*"))
    assert [p for p in leftovers if p.is_file()] == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_download_names_the_file_and_the_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESFIT_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}/")
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as err:
        resfit.create_model("resnet50", weights="pretrained", progress=False)
    msg = str(err.value)
    assert "resnet50-11ad3fa6.pth" in msg and str(tmp_path / "cache" / "weights") in msg
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_file_put_in_the_cache_by_hand_is_used_offline(tmp_path: Path, monkeypatch) -> None:
    ckpt = need(CIFAR_CKPTS) / "resnet20-12fca82f.th"
    monkeypatch.setenv("RESFIT_WEIGHTS_MIRROR", f"http://127.0.0.1:{_closed_port()}/")
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(tmp_path))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / ckpt.name).write_bytes(ckpt.read_bytes())
    model = resfit.create_model("resnet20_cifar", weights="resnet20_cifar.cifar10")
    assert model.pretrained_cfg["categories"][0] == "airplane"


def test_mirror_can_be_a_local_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RESFIT_WEIGHTS_MIRROR", str(need(CIFAR_CKPTS)))
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(tmp_path))
    resfit.create_model("resnet32_cifar", weights="pretrained", progress=False)
    assert (tmp_path / "weights" / "resnet32-d509ac18.th").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_carrying_a_payload_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, f)
    with pytest.raises(WeightsError, match="never unpickles"):
        resfit.create_model("resnet18", weights=evil)
    assert not marker.exists()


def test_safetensors_and_cifar_layout_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = resfit.create_model("resnet20_cifar")
    # The CIFAR checkpoints' own layout: wrapped, `module.`-prefixed, head named `linear`.
    sd = {f"module.{k.replace('fc.', 'linear.')}": v for k, v in src.state_dict().items()}
    sd = {k: v for k, v in sd.items() if "num_batches_tracked" not in k}
    torch.save({"best_prec1": 90.0, "state_dict": sd}, tmp_path / "ck.th")
    save_file(src.state_dict(), tmp_path / "ck.safetensors")
    for name in ("ck.th", "ck.safetensors"):
        model = resfit.create_model("resnet20_cifar", weights=tmp_path / name)
        torch.testing.assert_close(model.fc.weight, src.fc.weight)
    assert set(load_state_dict_file(tmp_path / "ck.th")) == set(sd_key[7:] for sd_key in sd)


def test_unknown_weights_name_and_wrong_arch_are_clear() -> None:
    with pytest.raises(WeightsError, match="unknown weights 'resnet50.nope'"):
        resfit.create_model("resnet50", weights="resnet50.nope")
    with pytest.raises(WeightsError, match="are for resnet18, not resnet50"):
        resfit.create_model("resnet50", weights="resnet18.imagenet1k_v1")
    with pytest.raises(WeightsError, match="does not exist"):
        resfit.create_model("resnet50", weights="missing/file.pth")


# ---------------------------------------------------------------------------------------------
# Weights of another channel count (issue 13, defect 4)


def _grey_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A one-channel resnet20_cifar with non-trivial BN statistics, saved as a run saves it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    grey = resfit.create_model("resnet20_cifar", num_classes=3, in_chans=1)
    gen = torch.Generator().manual_seed(1)
    for m in grey.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    path = tmp_path / "model.safetensors"
    save_file(grey.state_dict(), path)
    return grey.eval(), path


def test_one_channel_weights_load_for_one_and_for_three_channels(tmp_path: Path, caplog) -> None:
    grey, path = _grey_checkpoint(tmp_path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = grey(x)
        same = resfit.create_model("resnet20_cifar", weights=path, in_chans=1).eval()
        torch.testing.assert_close(same(x), want, rtol=0, atol=0)
        with caplog.at_level(logging.INFO, logger="resfit"):
            rgb = resfit.create_model("resnet20_cifar", weights=path).eval()
        # The grey filter spread over R, G and B: an image with R = G = B scores as before.
        assert rgb.conv1.weight.shape == (16, 3, 3, 3)
        torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), want, rtol=1e-4, atol=1e-5)
    assert f"{path} was trained on 1-channel images" in caplog.text
    assert "adapted to 3" in caplog.text


def test_weights_whose_channels_cannot_be_adapted_name_the_in_chans_to_use(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = resfit.create_model("resnet20_cifar", num_classes=3, in_chans=2)
    torch.save(src.state_dict(), tmp_path / "two.pth")
    with pytest.raises(
        WeightsError, match=r"two\.pth was trained on 2-channel images.*--in-chans 2"
    ):
        resfit.create_model("resnet20_cifar", weights=tmp_path / "two.pth")
    two = resfit.create_model("resnet20_cifar", weights=tmp_path / "two.pth", in_chans=2)
    torch.testing.assert_close(two.conv1.weight, src.conv1.weight)


def _train_cli(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "resfit", "train", str(data), "--out", str(out), "--epochs", "1",
           "--img-size", "16", "--arch", "resnet20_cifar", "--batch-size", "8", "--no-progress",
           "--no-report", "--leakage", "off", "--unknown-score", "none", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_fine_tunes_from_a_run_of_the_other_channel_count(tmp_path: Path) -> None:
    data = make_colour_folder(tmp_path / "data", per_class=4, splits=("train", "val"))
    runs = {}
    for name, chans in (("grey", "1"), ("rgb", "3")):
        res = _train_cli(data, tmp_path / name, "--in-chans", chans)
        assert res.returncode == 0, res.stderr
        runs[name] = tmp_path / name / "model.safetensors"
    for weights, chans in (("grey", "3"), ("rgb", "1"), ("grey", "1")):
        out = tmp_path / f"{weights}-to-{chans}"
        res = _train_cli(data, out, "--weights", str(runs[weights]), "--in-chans", chans)
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode == 0, res.stderr
        assert json.loads((out / "config.json").read_text())["in_chans"] == int(chans)

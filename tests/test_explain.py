"""Grad-CAM through forward_to / forward_from, and the overlay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from resfit.inference.explain import grad_cam, overlay_cam
from resfit.models.resnet import CifarResNet

SIZE = 32
HALF = SIZE // 2


class TwoQuadrantNet(nn.Module):
    """Class 0 sees only the top-right quadrant of the image, class 1 only the bottom-left.

    Two channel groups that never mix: group 0 (channels 0-3) is masked to the top-right
    quadrant, group 1 (channels 4-7) to the bottom-left; the classifier reads class 0 from
    group 0 only and class 1 from group 1 only. Grad-CAM must tell the classes apart, and put
    each in the right place (a transposed or flipped map lands in the wrong quadrant).
    """

    stage_names = ("stem", "layer1")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Dropout(0.5)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv.weight.abs_()  # positive responses to a positive image
            self.layer1[0].weight.abs_()
            self.layer1[0].bias.zero_()
            self.fc.weight.zero_()
            self.fc.weight[0, :4] = 1.0
            self.fc.weight[1, 4:] = 1.0
        mask = torch.zeros(1, 8, SIZE, SIZE)
        mask[:, :4, :HALF, HALF:] = 1.0  # top-right
        mask[:, 4:, HALF:, :HALF] = 1.0  # bottom-left
        self.register_buffer("mask", mask)

    def _run(self, name: str, x: Tensor) -> Tensor:
        if name == "stem":
            return torch.relu(self.bn(self.conv(x))) * self.mask
        return self.layer1(x)

    def forward_to(self, x: Tensor, stage: str) -> Tensor:
        for name in self.stage_names[: self.stage_names.index(stage) + 1]:
            x = self._run(name, x)
        return x

    def forward_from(self, h: Tensor, stage: str) -> Tensor:
        for name in self.stage_names[self.stage_names.index(stage) + 1 :]:
            h = self._run(name, h)
        return self.fc(torch.flatten(self.avgpool(h), 1))


def _quadrant_mass(cam: np.ndarray) -> dict[str, float]:
    total = float(cam.sum())
    return {
        "top_left": float(cam[:HALF, :HALF].sum()) / total,
        "top_right": float(cam[:HALF, HALF:].sum()) / total,
        "bottom_left": float(cam[HALF:, :HALF].sum()) / total,
        "bottom_right": float(cam[HALF:, HALF:].sum()) / total,
    }


def test_grad_cam_lights_up_the_quadrant_the_class_depends_on() -> None:
    model = TwoQuadrantNet()
    x = torch.rand(1, 3, SIZE, SIZE)
    cam0 = grad_cam(model, x, class_idx=0)
    cam1 = grad_cam(model, x, class_idx=1)
    for cam in (cam0, cam1):
        assert cam.shape == (SIZE, SIZE) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    # The grouped 3x3 conv can spill one pixel over the border; everything else is exact.
    assert _quadrant_mass(cam0)["top_right"] > 0.95
    assert _quadrant_mass(cam1)["bottom_left"] > 0.95
    peak = np.unravel_index(cam0.argmax(), cam0.shape)
    assert peak[0] < HALF <= peak[1]
    # Also at the earlier stage.
    cam_stem = grad_cam(model, x, class_idx=1, stage="stem")
    assert _quadrant_mass(cam_stem)["bottom_left"] > 0.99


def test_grad_cam_default_class_is_the_prediction() -> None:
    model = TwoQuadrantNet()
    x = torch.zeros(1, 3, SIZE, SIZE)
    # Content only inside the bottom-left quadrant (clear of the 3x3 reach of the others).
    x[:, :, HALF + 2 :, : HALF - 2] = 1.0
    assert (
        int(model.forward_from(model.forward_to(x, "layer1"), "layer1").argmax()) == 1
    )  # class 1 wins
    assert np.array_equal(grad_cam(model, x), grad_cam(model, x, class_idx=1))
    # No evidence at all for class 0: an empty map, not a division by zero.
    assert not grad_cam(model, x, class_idx=0).any()


def test_grad_cam_restores_mode_and_requires_grad() -> None:
    model = CifarResNet(8, num_classes=3)
    model.train()
    model.conv1.weight.requires_grad_(False)  # a frozen stem, as in fine-tuning
    flags = [p.requires_grad for p in model.parameters()]
    running_mean = model.bn1.running_mean.clone()
    cam = grad_cam(model, torch.randn(3, 40, 48), stage="layer2")  # (C, H, W) is accepted
    assert cam.shape == (40, 48)
    assert model.training
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients computed
    assert torch.equal(model.bn1.running_mean, running_mean)  # ran in eval mode

    model.eval()
    with pytest.raises(ValueError, match="unknown stage"):
        grad_cam(model, torch.randn(1, 3, 32, 32), stage="layer9")
    assert not model.training
    with pytest.raises(ValueError, match="class_idx"):
        grad_cam(model, torch.randn(1, 3, 32, 32), class_idx=3)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored after an error too
    with pytest.raises(ValueError, match="one image"):
        grad_cam(model, torch.randn(2, 3, 32, 32))


def test_overlay_cam_colours_the_hot_region() -> None:
    photo = Image.new("RGB", (200, 100), (128, 128, 128))
    cam = np.zeros((32, 32), np.float32)
    cam[:, 16:] = 1.0  # right half hot
    out = overlay_cam(photo, cam, alpha=0.5)
    assert out.size == photo.size and out.mode == "RGB"
    px = np.asarray(out, dtype=int)
    left, right = px[50, 20], px[50, 180]
    # jet: 0 is dark blue, 1 is dark red.
    assert left[2] > left[0] and right[0] > right[2]
    assert np.array_equal(np.asarray(overlay_cam(photo, cam, alpha=0.0)), np.asarray(photo))
    with pytest.raises(ValueError):
        overlay_cam(photo, cam, alpha=1.5)


def test_explain_names_never_collide_or_leave_the_folder_for_any_class_name(tmp_path) -> None:
    """Issue 26: a/cat.png and b/cat.png overwrote each other; a class with "/" crashed."""
    import json
    import os
    import subprocess
    import sys

    from .test_inference import make_run

    run = make_run(tmp_path)
    odd = [os.fsdecode(b"caf\xe9"), "x/../../y", "two\nlines"]  # not UTF-8, a path, a newline
    (run / "classes.json").write_text(json.dumps(odd))
    rng = np.random.default_rng(0)
    images = [tmp_path / "in" / d / "cat.png" for d in ("a", "b")]
    for p in images:
        p.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
    out = tmp_path / "cam"
    for cls in [None, *odd]:
        args = [sys.executable, "-m", "resfit", "explain", str(run), *map(str, images), "--out",
                str(out), *(["--class", cls] if cls else [])]  # fmt: skip
        res = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
    made = [p for p in tmp_path.rglob("*.png") if p not in images]
    assert all(p.parent == out for p in made), made  # nothing escaped the folder
    # Two images per class asked for (three), each its own file; the unasked run's two
    # overlays are among them, for the predicted class.
    assert len(made) == 2 * len(odd)
    for cls in odd:
        assert sum(p.name.endswith(f".{cls.replace('/', '%2F')}.png") for p in made) == 2

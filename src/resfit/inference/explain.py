"""Where did the model look? Grad-CAM (Selvaraju et al. 2017) on resfit's staged models.

No hooks: the model is split at a stage by its adapter (``forward_to`` / ``forward_from``, see
:mod:`resfit.models.adapters`), so the stage's output is an ordinary tensor we can take the gradient
against. Any model with a registered adapter works (torchvision's ResNets included), and so
does one that has ``stage_names``, ``forward_to`` and ``forward_from`` of its own. Only the part after the stage
is differentiated and no parameter gradient is ever computed.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.windows import Window
from ..data.decode import load_image, resize_shorter, to_tensor
from ..data.preprocessing import base_size_for
from ..models.adapters import ModelAdapter, adapt, has_adapter

_STAGED = ("stage_names", "forward_to", "forward_from")


def _split(model: nn.Module) -> ModelAdapter | nn.Module:
    """What splits ``model`` at a stage: its adapter, or the model itself where it has the
    staged interface of its own (``stage_names``, ``forward_to``, ``forward_from``)."""
    if not has_adapter(model) and all(hasattr(model, a) for a in _STAGED):
        return model
    return adapt(model)  # a ConfigError that says how to register an adapter, if none fits


__all__ = ["grad_cam", "overlay_cam", "overlay_file", "overlay_stems"]


def grad_cam(
    model: nn.Module,
    x: Tensor,
    class_idx: int | None = None,
    stage: str | None = None,
) -> np.ndarray:
    """Grad-CAM heat map of ``class_idx`` (default: the predicted class) for one image.

    ``x``: the preprocessed image, shape (1, C, H, W) (or (C, H, W)), on any device; it is
    moved to the model's device. ``stage``: which stage's output to explain; default the last
    one (coarsest, most class-specific). Returns a float32 (H, W) map in [0, 1], upsampled to
    the input size; all zeros when nothing supports the class.

    The model is run in eval mode (BatchNorm statistics, no dropout); its train/eval mode and
    every parameter's ``requires_grad`` are restored afterwards, even on error.
    """
    split = _split(model)
    x = _one_image(x)
    stage = stage or split.stage_names[-1]
    if stage not in split.stage_names:
        raise ConfigError(f"unknown stage {stage!r}; this model has {list(split.stage_names)}")

    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device, param.dtype)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)  # only d(logit)/d(activation) is needed
        with torch.no_grad():
            acts = split.forward_to(x, stage)
        acts = acts.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = split.forward_from(acts, stage)
            if class_idx is None:
                class_idx = int(logits[0].argmax())
            if not 0 <= class_idx < logits.shape[1]:
                raise ConfigError(f"class_idx {class_idx} outside [0, {logits.shape[1] - 1}]")
            (grads,) = torch.autograd.grad(logits[0, class_idx], acts)
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)

    return _cam_map(grads, acts.detach(), x.shape[-2:])


def _one_image(x: Tensor) -> Tensor:
    """``x`` as a batch of one, (1, C, H, W); anything else is refused."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"grad_cam explains one image: expected (1, C, H, W), got {tuple(x.shape)}"
        )
    return x


def _cam_map(grads: Tensor, acts: Tensor, size: tuple[int, ...]) -> np.ndarray:
    """The Grad-CAM map at ``size``, scaled to [0, 1] (all zeros when nothing supports the
    class)."""
    # Channel weights: the spatially averaged gradient; the map: ReLU of the weighted sum, so
    # only evidence *for* the class shows.
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0]
    cam = cam.float().cpu().numpy()
    top = float(cam.max())
    if not np.isfinite(top) or top <= 0:
        return np.zeros(cam.shape, dtype=np.float32)
    return np.clip(cam / top, 0.0, 1.0).astype(np.float32)


def overlay_cam(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a [0, 1] heat map over ``image`` with the jet colormap (red = most evidence).

    The map is resized to the image (bilinear), so a 32x32 or 224x224 map fits any photo;
    pass the image as the model saw it (same crop) for the colours to land in the right place.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D (H, W) map, got shape {cam.shape}")
    rgb = image.convert("RGB")
    cam_img = Image.fromarray(np.nan_to_num(np.clip(cam, 0.0, 1.0)).astype(np.float32))
    cam_img = cam_img.resize(rgb.size, Image.Resampling.BILINEAR)
    heat = matplotlib.colormaps["jet"](np.clip(np.asarray(cam_img), 0.0, 1.0))[..., :3]
    base = np.asarray(rgb, dtype=np.float32) / 255.0
    out = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(out * 255.0).astype(np.uint8))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def overlay_stems(paths: Sequence[str | os.PathLike]) -> dict[str, str]:
    """The name each input's overlays start with: its stem, or where two inputs share one
    (``a/cat.jpg``, ``b/cat.jpg``), the stem and a short hash of the whole path, so that one
    never overwrites the other. The same inputs give the same names in any order."""
    stems = {os.fspath(p): Path(p).stem for p in paths}
    shared = Counter(stems.values())
    return {p: s if shared[s] == 1 else f"{s}-{_short_hash(p)}" for p, s in stems.items()}


def overlay_file(stem: str, class_name: str) -> str:
    """``{stem}.{class}.png``, one file name whatever the class is called: ``/``, ``\\`` and
    NUL are %-escaped (with ``%`` itself, so distinct classes keep distinct names), and a name
    too long for the file system is shortened with a hash of the whole."""
    safe = class_name.replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    name = f"{stem}.{safe.replace(chr(0), '%00')}.png"
    if len(name.encode("utf-8", "surrogateescape")) > 240:  # most file systems allow 255 bytes
        name = f"{stem[:50]}.{safe[:50]}-{_short_hash(name)}.png"
    return name


def make_explainer(
    model: nn.Module,
    img_size: int,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    *,
    base_size: int | None = None,
    window: Window = None,
) -> Callable:
    """A Grad-CAM overlay maker for the report: path, class -> PIL image of what the model saw.

    ``base_size`` is the shorter side images are decoded at (a run's ``decode_size``; default
    :func:`~resfit.data.augmentation.base_size_for` ``(img_size)``), so the overlay shows the crop
    the model was given. ``window``: the run's intensity window (DICOM and 16-bit images).
    """
    size = base_size or base_size_for(img_size)
    overlay = make_overlay(model, img_size, transform, device)

    def explain(path: str, class_idx: int):
        return overlay(to_tensor(resize_shorter(load_image(path, window=window), size)), class_idx)

    return explain


def make_overlay(
    model: nn.Module, img_size: int, transform: Callable[[Tensor], Tensor], device: torch.device
) -> Callable:
    """Grad-CAM for an image already decoded at the run's size (uint8 (3, H, W), as the
    service decodes a request): image, class index (None: the model's top class) -> the
    overlay on the centre crop the model saw, as a PIL image."""
    from torchvision.transforms.v2.functional import center_crop, to_pil_image

    def overlay(img: Tensor, class_idx: int | None):
        x = transform(img)[None].to(device)
        cam = grad_cam(model, x, class_idx)
        shown = to_pil_image(center_crop(img, [img_size, img_size]))
        if img_size < 128:  # thumbnails of tiny inputs are unreadable
            shown = shown.resize((128, 128))
        return overlay_cam(shown, cam)

    return overlay

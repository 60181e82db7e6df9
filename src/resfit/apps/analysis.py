"""What the residual connection buys: per-block gradient norms of a ResNet and its plain twin.

``gradient_flow`` builds each architecture with the same seed, puts one batch of real images
through it in training mode (BatchNorm on batch statistics, as during training) and records the
L2 norm of the gradient of the cross-entropy loss with respect to each residual block's
convolution weights, at initialisation and optionally after a few SGD steps on that batch.

Only the residual *branch* convolutions are counted (projection shortcuts are left out) so that
a ResNet and its plain twin are measured on exactly the same weights.

Knows nothing of the training loop, data pipelines or the CLI (it loads its few images
itself); its SGD steps go through the TrainStep that training runs.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.atomic import atomic_open, atomic_path, atomic_write_text
from ..core.errors import ConfigError, DataError
from ..models.adapters import adapt
from ..models.resnet import build_model, get_spec
from ..models.weights import IMAGENET_MEAN, IMAGENET_STD
from ..tasks.single import SingleLabel
from ..training.step import TrainStep

__all__ = [
    "block_convs",
    "gradient_flow",
    "load_digits_images",
    "load_folder_images",
    "run_gradient_flow",
    "summarise_gradient_flow",
    "write_gradient_flow",
]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
CSV_FIELDS = (
    "arch", "phase", "step", "block", "depth", "rel_depth", "layer", "grad_norm", "weight_norm",
    "loss",
)  # fmt: skip


def block_convs(model: nn.Module) -> list[tuple[str, int, list[nn.Conv2d]]]:
    """Every residual block in forward order as ``(name, depth, convs)``.

    ``depth`` is the weighted-layer index of the block's last convolution along the main path
    (the stem conv is layer 1), the paper's way of counting depth. ``convs`` are the residual
    branch's convolutions only, never a projection shortcut.
    """
    a = adapt(model)
    out: list[tuple[str, int, list[nn.Conv2d]]] = []
    depth = 1  # the stem conv
    for stage in a.stage_names:
        if stage == "stem":
            continue
        blocks = [b for m in a.stage_modules(stage) for b in m.children()]
        for i, block in enumerate(blocks):
            # The branch convs of a ResNet block are its ``convN`` children (resfit's and
            # torchvision's alike); the projection shortcut is ``downsample``.
            convs = [
                m
                for n, m in block.named_children()
                if n.startswith("conv") and isinstance(m, nn.Conv2d)
            ]
            if not convs:
                continue
            depth += len(convs)
            out.append((f"{stage}.{i}", depth, convs))
    if not out:
        raise ConfigError(f"{type(model).__name__} has no residual blocks to measure")
    return out


def _grad_norm(convs: list[nn.Conv2d]) -> float:
    sq = sum(float(c.weight.grad.double().pow(2).sum()) for c in convs if c.weight.grad is not None)
    return math.sqrt(sq)


def _weight_norm(convs: list[nn.Conv2d]) -> float:
    # Recorded because BN makes the loss blind to a conv's weight scale: the gradient shrinks as
    # 1/||W||, so a large step that inflates ||W|| also damps every later gradient of that block.
    return math.sqrt(sum(float(c.weight.detach().double().pow(2).sum()) for c in convs))


def gradient_flow(
    archs: list[str],
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = 0,
    lr: float = 0.1,
    seed: int = 0,
) -> list[dict]:
    """Per-block gradient norms of each architecture on one batch of (normalised) images.

    One row per block and phase: ``arch``, ``phase`` ("init" or "after N steps"), ``step``,
    ``block`` (1-based index), ``depth`` (weighted-layer index, see ``block_convs``),
    ``rel_depth`` (depth / deepest block), ``layer`` ("layer2.3"), ``grad_norm``,
    ``weight_norm`` (of the same convs) and the batch ``loss``. With ``steps > 0`` the model then takes that many SGD steps (momentum 0.9, weight
    decay 5e-4, the training recipe) on the same batch and is measured again.
    """
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError("images must be N x C x H x W with one label per image")
    if steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {steps}")
    rows: list[dict] = []
    for arch in archs:
        rows.extend(_arch_rows(arch, images, labels, steps, lr, seed))
    return rows


def _arch_rows(
    arch: str, images: Tensor, labels: Tensor, steps: int, lr: float, seed: int
) -> list[dict]:
    spec = get_spec(arch)
    num_classes = max(spec.default_num_classes, int(labels.max()) + 1)
    # Same seed per architecture: a ResNet and its plain twin start from identical weights.
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes).train()
    blocks = block_convs(model)
    last = blocks[-1][1]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    grads: list[float] = []

    def read_grads(*_: object) -> None:  # after backward, before the update: this step's
        grads[:] = [_grad_norm(convs) for _, _, convs in blocks]

    opt.register_step_pre_hook(read_grads)
    # The step training runs, in fp32 NCHW: the figures are about the network, not speed.
    train_step = TrainStep(opt, SingleLabel().loss, images.device, "fp32", channels_last=False)
    rows: list[dict] = []
    for step in range(steps + 1):
        weights = [_weight_norm(convs) for _, _, convs in blocks]
        _, loss = train_step(model, images, labels)  # the last update is never measured
        if step == 0 or step == steps:
            phase = "init" if step == 0 else f"after {steps} step{'s' if steps > 1 else ''}"
            blockwise = zip(blocks, grads, weights, strict=True)
            for i, ((name, depth, _), g, w) in enumerate(blockwise, start=1):
                rows.append({"arch": arch, "phase": phase, "step": step, "block": i,
                             "depth": depth, "rel_depth": depth / last, "layer": name,
                             "grad_norm": g, "weight_norm": w, "loss": float(loss.detach())})  # fmt: skip
    return rows


def summarise_gradient_flow(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per architecture and phase: first-block / last-block grad norm ratio, max / min spread
    across all blocks, and the loss. Non-finite norms (a diverged net) give NaN ratios."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for phase in dict.fromkeys(r["phase"] for r in rows if r["arch"] == arch):
            sel = sorted(
                (r for r in rows if r["arch"] == arch and r["phase"] == phase),
                key=lambda r: r["block"],
            )
            g = np.array([r["grad_norm"] for r in sel], dtype=float)
            ok = bool(np.isfinite(g).all() and (g > 0).all())
            nan = float("nan")
            out.setdefault(arch, {})[phase] = {
                "first_last_ratio": float(g[0] / g[-1]) if ok else nan,
                "spread": float(g.max() / g.min()) if ok else nan,
                "first": float(g[0]),
                "last": float(g[-1]),
                "first_weight_norm": float(sel[0]["weight_norm"]),
                "loss": float(sel[0]["loss"]),
            }
    return out


def _write_gradient_flow_csv(rows: list[dict], csv_path: Path) -> None:
    with atomic_open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: f"{r[k]:.6g}" for k in ("grad_norm", "weight_norm", "loss")}})


def _label_panel(ax: Any, phase: str, what: str) -> None:
    """Axes, title, grid and legend of one panel of the gradient-flow figure."""
    ax.set_yscale("log")
    ax.set_xlabel("depth (weighted layer index of the block's last conv)")
    if what == "grad_norm":
        ax.set_ylabel("||dL/dW|| of the block's convs")
        ax.set_title(f"gradient norm, {phase}")
    else:
        ax.set_ylabel("||W|| / ||W|| at init")
        ax.set_title(f"weight norm growth, {phase}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_gradient_flow(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Write ``gradient_flow.csv`` and ``gradient_flow.png`` (depth on x, log grad norm on y,
    one line per architecture, one panel per phase, plus the weight-norm growth over the steps
    when there are steps) into ``out_dir``; return both paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "gradient_flow.csv", out_dir / "gradient_flow.png"
    _write_gradient_flow_csv(rows, csv_path)

    phases = list(dict.fromkeys(r["phase"] for r in rows))
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    # A ResNet and its plain twin share a colour (solid vs dashed) so the pairs read at a glance.
    twins = list(dict.fromkeys(a.replace("plain", "resnet", 1) for a in archs))
    style = {
        a: (f"C{twins.index(a.replace('plain', 'resnet', 1)) % 10}",
            "-" if get_spec(a).residual else "--")
        for a in archs
    }  # fmt: skip
    panels = [(p, "grad_norm") for p in phases]
    if len(phases) > 1:
        panels.append((phases[-1], "weight_growth"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    for ax, (phase, what) in zip(axes[0], panels, strict=True):
        for arch in archs:
            sel = [r for r in rows if r["arch"] == arch and r["phase"] == phase]
            if what == "grad_norm":
                ys = [r["grad_norm"] for r in sel]
            else:  # ||W|| after the steps over ||W|| at init, block by block
                init = {r["block"]: r["weight_norm"] for r in rows
                        if r["arch"] == arch and r["phase"] == phases[0]}  # fmt: skip
                ys = [r["weight_norm"] / init[r["block"]] for r in sel]
            color, ls = style[arch]
            ax.plot(
                [r["depth"] for r in sel],
                [y if math.isfinite(y) else np.nan for y in ys],
                linestyle=ls,
                marker="o",
                markersize=3,
                color=color,
                label=f"{arch} (loss {sel[0]['loss']:.2f})",
            )
        _label_panel(ax, phase, what)
    fig.suptitle("Gradient norm per residual block (plain twins dashed)")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return csv_path, png_path


# ---------------------------------------------------------------------------------------------
# Real images, loaded without the data pipeline


def _normalise(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _resize_center(img: Tensor, size: int) -> Tensor:
    # Shorter side to ``size``, then the central square: keeps the aspect ratio of photos.
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        img = img[:, top : top + size, left : left + size]
    return img


def _balanced_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    # Round-robin over classes from a seeded shuffle: every class is represented in a small batch.
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.array(order[:n])


def load_folder_images(
    root: Path, n_images: int, size: int, seed: int = 0
) -> tuple[Tensor, Tensor, list[str]]:
    """``n_images`` images, balanced over the class folders of ``root``, as a normalised
    N x 3 x size x size float batch, their labels and the class names."""
    from torchvision.io import ImageReadMode, decode_image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [c] * len(found)
    if not files:
        raise DataError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {root}")
    pick = _balanced_pick(np.array(labels), n_images, seed)
    imgs = [
        _resize_center(decode_image(str(files[i]), mode=ImageReadMode.RGB).float() / 255, size)
        for i in pick
    ]
    y = torch.tensor([labels[i] for i in pick], dtype=torch.long)
    return _normalise(torch.stack(imgs)), y, classes


def load_digits_images(n_images: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits (real scans, 8x8, offline), upscaled to
    size x size RGB and normalised like the other images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pick = _balanced_pick(digits.target, n_images, seed)
    x = torch.from_numpy(digits.images[pick]).float()[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return _normalise(x.expand(-1, 3, -1, -1).contiguous()), torch.from_numpy(digits.target[pick])


def run_gradient_flow(
    archs: list[str],
    data: Path | None,
    out: Path,
    *,
    steps: int = 5,
    n_images: int = 128,
    seed: int = 0,
) -> dict:
    """Measure, write ``gradient_flow.csv/.png/.json`` into ``out`` and return the summary.

    ``data``: a folder of class folders (e.g. cifar10 ``test/``); each image is resized to the
    architecture's input size (32 for the CIFAR nets). ``None``: scikit-learn's digits.
    """
    if not archs:
        raise ConfigError("name at least one architecture")
    by_size: dict[int, list[str]] = {}
    for arch in archs:
        by_size.setdefault(get_spec(arch).default_input_size, []).append(arch)
    rows: list[dict] = []
    for size, group in by_size.items():
        if data is None:
            x, y = load_digits_images(n_images, size, seed)
        else:
            x, y, _ = load_folder_images(Path(data), n_images, size, seed)
        rows += gradient_flow(group, x, y, steps=steps, seed=seed)
    rows.sort(key=lambda r: (archs.index(r["arch"]), r["step"], r["block"]))
    csv_path, png_path = write_gradient_flow(rows, Path(out))
    summary = {
        "archs": summarise_gradient_flow(rows),
        "data": str(data) if data is not None else "sklearn digits (8x8 upscaled)",
        "n_images": n_images,
        "steps": steps,
        "seed": seed,
        "csv": str(csv_path),
        "png": str(png_path),
    }
    json_path = Path(out) / "gradient_flow.json"
    atomic_write_text(json_path, json.dumps(summary, indent=2, allow_nan=True) + "\n")
    summary["json"] = str(json_path)
    return summary

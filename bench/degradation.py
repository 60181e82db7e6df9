# The degradation experiment of He et al. 2015 (section 4.2, figure 6) on cifar10-jpg.
#
# Trains plain-20, plain-56, ResNet-20 and ResNet-56 (CIFAR nets of the paper, option-A
# shortcuts; the plain twins are the same layers without the shortcut addition) with ONE recipe:
# SGD momentum 0.9, lr 0.1 (x batch/128), weight decay 5e-4 (the paper: 1e-4), batch 128,
# random 32px crops from 4px zero padding + horizontal flips, lr / 10 at 50 % and 75 % of the
# epochs (the paper's 32k and 48k of 64k iterations) or cosine. Each step is resfit's
# TrainStep (resfit.training.step, the step `resfit train` runs), over that recipe's optimizer
# and with plain cross-entropy; the recipe itself is the paper's, not resfit's defaults (which
# would mean label smoothing, no decay on BN and biases, Nesterov). Per epoch it records the
# training error (running error on the augmented mini-batches, in train mode, as the paper's
# dashed curves) and the test error (eval mode, the test set or a balanced subset of it), then
# writes degradation.csv, degradation.json (machine, epochs, wall time) and degradation.png in
# the manner of figure 6: train error dashed, test error solid, plain nets left, ResNets right.
#
# The question it answers: is the deeper plain net worse than the shallower one on the
# TRAINING set (optimisation difficulty, not overfitting), and does the shortcut reverse that?
#
# Commands (from the repository root, with ../shared/assets present):
#   GPU, the figure in docs/ (H200: 322 s wall, 4 processes in parallel, bf16 + channels_last):
#     python bench/degradation.py --device cuda --parallel --epochs 30 --out runs/degradation
#   GPU, the paper's length (64k iterations = 164 epochs; add --wd 1e-4 for its weight decay),
#   about 28 min on an H200 (ResNet-56, the slowest process, takes ~10 s per epoch):
#     python bench/degradation.py --device cuda --parallel --epochs 164 --out runs/degradation
#   CPU smoke run (2 shared cores: ~9 s per ResNet-56 step of 128 images, so keep it tiny):
#     python bench/degradation.py --device cpu --epochs 1 --train-subset 1280 --test-subset 500
#
# Last figures (NVIDIA H200, torch 2.11, 30 epochs, all 50k train / 10k test cifar10-jpg
# images, step lr 0.1 -> /10 after 15 and 22.5 epochs, wd 5e-4, batch 128, seed 0; docs/),
# printed by this file's own copy of the step before it used TrainStep (same recipe, same
# arithmetic: forward under autocast, fp32 cross-entropy, backward, SGD update):
#   arch        train err  test err   wall
#   plain-20      13.19 %   16.12 %   120 s
#   plain-56      31.36 %   30.58 %   300 s   <- deeper plain net: worse on the TRAINING set
#   ResNet-20      9.95 %   13.96 %   133 s
#   ResNet-56      8.09 %   13.01 %   308 s   <- deeper ResNet: better on both
#   (9-epoch run, same machine: plain-20/56 train 24.2 / 61.5 %, ResNet-20/56 18.0 / 21.0 %.)
"""Degradation experiment: plain-20/56 vs ResNet-20/56 on CIFAR-10, train and test error."""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a bare checkout (e.g. a GPU box) too
    sys.path.insert(0, str(ROOT / "src"))

from resfit.core import runtime  # noqa: E402
from resfit.core.config import OptimConfig  # noqa: E402
from resfit.models.resnet import build_model, get_spec  # noqa: E402
from resfit.tasks.single import SingleLabel  # noqa: E402
from resfit.training.step import TrainStep, make_optimizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "assets" / "datasets" / "cifar10-jpg.zip"
DEFAULT_ARCHS = ("plain20_cifar", "plain56_cifar", "resnet20_cifar", "resnet56_cifar")
CSV_FIELDS = ("arch", "epoch", "lr", "train_loss", "train_err", "test_err", "epoch_s")


# ---------------------------------------------------------------------------------------------
# Data: every JPEG decoded once into one uint8 tensor


def _balanced(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    # A subset with every class equally represented, the same one for every architecture.
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per))) for idx in per if i < len(idx)]
    return np.sort(np.array(order[:n]))


def load_split(
    data: Path, split: str, subset: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, list[str]]:
    """``split``/<class>/*.jpg from a zip or a folder as (N x 3 x 32 x 32 uint8, labels, classes).
    Only the picked subset is decoded."""
    from torchvision.io import decode_jpeg

    data = Path(data)
    if data.suffix == ".zip":
        zf = zipfile.ZipFile(data)
        names = [n for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg")]
        read = zf.read
    else:
        zf = None
        names = [str(p.relative_to(data)) for p in (data / split).glob("*/*.jpg")]

        def read(name: str) -> bytes:
            return (data / name).read_bytes()

    names.sort()
    if not names:
        raise SystemExit(f"no {split}/<class>/*.jpg in {data}")
    classes = sorted({n.split("/")[1] for n in names})
    labels = np.array([classes.index(n.split("/")[1]) for n in names])
    pick = _balanced(labels, subset, seed)
    raw = [torch.frombuffer(bytearray(read(names[i])), dtype=torch.uint8) for i in pick]
    if zf is not None:
        zf.close()
    x = torch.stack(decode_jpeg(raw))
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(labels[pick]).long(), classes


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crops from a ``pad``-pixel zero-padded border plus random horizontal flips, on
    whichever device ``x`` lives (one gather, no per-image Python)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = xp[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(3, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(b, generator=gen, device=gen.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(epoch_frac: float, epochs: int, base: float, schedule: str, warmup: float) -> float:
    """The learning rate at a fractional epoch: linear warmup, then step (/10 at 50 % and 75 %,
    the paper's 32k/48k of 64k) or cosine to zero."""
    if warmup > 0 and epoch_frac < warmup:
        return base * (epoch_frac + 1e-3) / warmup
    t = epoch_frac / epochs
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * t))
    return base * (0.01 if t >= 0.75 else 0.1 if t >= 0.5 else 1.0)


def evaluate(
    model: torch.nn.Module, x: Tensor, y: Tensor, norm, precision: str, bs: int = 1000
) -> float:
    """Top-1 error in % (eval mode: BN running statistics)."""
    model.eval()
    wrong = 0
    with torch.no_grad(), runtime.autocast(x.device, precision):
        for i in range(0, len(x), bs):
            wrong += int((model(norm(x[i : i + bs])).argmax(1) != y[i : i + bs]).sum())
    model.train()
    return 100.0 * wrong / len(x)


def train_arch(
    arch: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    args: argparse.Namespace,
    device: torch.device,
    log_row,
) -> list[dict]:
    """Train one architecture with the shared recipe; one dict per epoch."""
    xtr, ytr = train
    xte, yte = test
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)  # same init seed and same batch order for every arch
    gen = torch.Generator(device=device).manual_seed(args.seed)
    model = build_model(arch, num_classes=10).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    mean = xtr.float().mean((0, 2, 3), keepdim=True) / 255
    std = xtr.float().std((0, 2, 3), keepdim=True) / 255
    fmt = torch.channels_last if cuda else torch.contiguous_format

    def norm(u: Tensor) -> Tensor:
        return ((u.float() / 255 - mean) / std).contiguous(memory_format=fmt)

    # Mixed precision on CUDA only (the CPU smoke run stays fp32, as the figures' runs did).
    precision = args.amp if cuda and args.amp != "none" else "fp32"
    base_lr = args.lr * args.batch_size / 128
    # The paper's recipe: plain momentum, weight decay on every parameter (one group).
    groups = [{"params": list(model.parameters()), "weight_decay": args.wd}]
    opt = make_optimizer(OptimConfig(momentum=0.9, nesterov=False), groups, base_lr)
    # resfit's training step, with the loss scaling its fp16 runs add; no label smoothing.
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    step = TrainStep(opt, SingleLabel().loss, device, precision, channels_last=cuda, scaler=scaler)
    n = len(xtr)
    steps = n // args.batch_size  # drop the ragged last batch: BN needs a real batch
    rows = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        wrong = torch.zeros((), device=device, dtype=torch.long)
        for s in range(steps):
            lr = lr_at(epoch - 1 + s / steps, args.epochs, base_lr, args.schedule, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
            yb = ytr[idx]
            out, loss = step(model, norm(augment(xtr[idx], gen)), yb)
            # Accumulate on the device: no host sync inside the epoch.
            loss_sum += loss.detach().float()
            wrong += (out.detach().argmax(1) != yb).sum()
        train_err = 100.0 * int(wrong) / (steps * args.batch_size)
        test_err = evaluate(model, xte, yte, norm, precision)
        if cuda:
            torch.cuda.synchronize()
        row = {
            "arch": arch,
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(loss_sum) / steps,
            "train_err": train_err,
            "test_err": test_err,
            "epoch_s": time.perf_counter() - t0,
        }
        rows.append(row)
        log_row(row)
        print(
            f"{arch:16s} epoch {epoch:3d}/{args.epochs}  lr {lr:.4f}  loss {row['train_loss']:.3f}"
            f"  train err {train_err:5.2f} %  test err {test_err:5.2f} %  ({row['epoch_s']:.1f} s)",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def read_csv(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [
            {k: (v if k == "arch" else int(v) if k == "epoch" else float(v)) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def plot(rows: list[dict], png: Path, title: str = "") -> Path:
    """Figure 6 of the paper: plain nets left, ResNets right; train error dashed, test solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(dict.fromkeys(r["arch"] for r in rows))
    panels = [("plain", [a for a in archs if not get_spec(a).residual]),
              ("ResNet", [a for a in archs if get_spec(a).residual])]  # fmt: skip
    panels = [(t, a) for t, a in panels if a]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    top = max(r["train_err"] for r in rows) if rows else 100
    top = max(top, max((r["test_err"] for r in rows), default=0))
    for ax, (kind, group) in zip(axes[0], panels, strict=True):
        for a in group:
            found = re.search(r"\d+", a)
            depth = int(found.group()) if found else None
            color = {20: "C0", 32: "C2", 44: "C1", 56: "C3", 110: "C4"}.get(depth, None)
            sel = [r for r in rows if r["arch"] == a]
            ep = [r["epoch"] for r in sel]
            label = f"{kind}-{depth}" if depth else a
            ax.plot(ep, [r["train_err"] for r in sel], "--", color=color, label=f"{label} train")
            ax.plot(ep, [r["test_err"] for r in sel], "-", color=color, lw=2, label=f"{label} test")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_ylim(0, min(100, top * 1.05))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{kind} networks")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def machine_name(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} + {name}"
    return f"{name}; torch {torch.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpg zip or folder")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "degradation")
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-subset", type=int, default=None, help="balanced subset size")
    p.add_argument("--test-subset", type=int, default=None, help="balanced subset size")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="at batch 128, scaled linearly")
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--warmup", type=float, default=0.0, help="linear warmup epochs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16", help="CUDA only")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", action="store_true", help="one process per arch (GPU)")
    p.add_argument("--plot-only", type=Path, nargs="+", help="only redraw from degradation.csv(s)")
    return p.parse_args(argv)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _summarise(
    rows: list[dict], args: argparse.Namespace, machine: str, sizes: tuple[int, int], wall: dict
) -> dict:
    """Write degradation.png and degradation.json into ``args.out``; return the summary."""
    out = Path(args.out)
    final = {
        a: {k: r[k] for k in ("train_err", "test_err", "train_loss")}
        for a in args.archs
        for r in rows
        if r["arch"] == a and r["epoch"] == args.epochs
    }
    title = (
        f"CIFAR-10 (jpg) {sizes[0]} train / {sizes[1]} test, {args.epochs} epochs, "
        f"{args.schedule} lr {args.lr}, wd {args.wd}, batch {args.batch_size}; "
        f"{machine.split(';')[0]}"
    )
    png = plot(rows, out / "degradation.png", title)
    summary = {
        "machine": machine,
        "device": args.device,
        "amp": args.amp if args.device.startswith("cuda") else "none (fp32)",
        "epochs": args.epochs,
        "n_train": sizes[0],
        "n_test": sizes[1],
        "recipe": {
            "batch_size": args.batch_size,
            "lr": args.lr,
            "momentum": 0.9,
            "weight_decay": args.wd,
            "schedule": args.schedule,
            "warmup_epochs": args.warmup,
            "augment": "4px zero-pad random crop + horizontal flip",
            "seed": args.seed,
        },
        "final": final,
        "wall_s": wall,
        "command": "python bench/degradation.py " + " ".join(args.argv),
        "csv": str(out / "degradation.csv"),
        "png": str(png),
    }
    (out / "degradation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"final": final, "wall_s": wall}, indent=1), flush=True)
    return summary


def _child_argv(args: argparse.Namespace, arch: str, out: Path) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--data", str(args.data), "--out", str(out)]
    argv += ["--archs", arch, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    argv += ["--lr", str(args.lr), "--wd", str(args.wd), "--schedule", args.schedule]
    argv += ["--warmup", str(args.warmup), "--device", args.device, "--amp", args.amp]
    argv += ["--seed", str(args.seed)]
    for flag, v in (("--train-subset", args.train_subset), ("--test-subset", args.test_subset)):
        if v is not None:
            argv += [flag, str(v)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def run_parallel(args: argparse.Namespace) -> dict:
    """One process per architecture, all at once, then one merged CSV/JSON/PNG.

    Why: these nets are small enough that one training process mostly waits on kernel
    launches; several processes keep a large GPU busy (same recipe, same seed, same data)."""
    out = Path(args.out)
    t0 = time.perf_counter()
    parts = {a: out / f".part-{a}" for a in args.archs}
    procs = {
        a: subprocess.Popen([sys.executable, *_child_argv(args, a, p)]) for a, p in parts.items()
    }
    failed = [a for a, p in procs.items() if p.wait() != 0]
    rows: list[dict] = []
    for part in parts.values():
        if (part / "degradation.csv").exists():
            rows += read_csv(part / "degradation.csv")
    _write_csv(out / "degradation.csv", rows)
    if failed:
        raise SystemExit(f"training failed for {failed}; rows so far in {out / 'degradation.csv'}")
    infos = [json.loads((p / "degradation.json").read_text()) for p in parts.values()]
    wall = {"data": max(i["wall_s"]["data"] for i in infos)}
    wall |= {a: i["wall_s"][a] for a, i in zip(args.archs, infos, strict=True)}
    wall["total"] = time.perf_counter() - t0
    sizes = (infos[0]["n_train"], infos[0]["n_test"])
    machine = f"{infos[0]['machine']}; {len(procs)} processes in parallel"
    for p in parts.values():
        shutil.rmtree(p)
    return _summarise(rows, args, machine, sizes, wall)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        rows = [r for path in args.plot_only for r in read_csv(path)]
        return {"png": str(plot(rows, out / "degradation.png"))}
    for a in args.archs:
        get_spec(a)  # fail on a typo before minutes of data loading
    if args.parallel and len(args.archs) > 1:
        return run_parallel(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    xtr, ytr, _ = load_split(args.data, "train", args.train_subset, args.seed)
    xte, yte, _ = load_split(args.data, "test", args.test_subset, args.seed)
    t_data = time.perf_counter() - t_start
    print(f"data: {len(xtr)} train / {len(xte)} test images in {t_data:.1f} s", flush=True)
    sizes = (len(xtr), len(xte))
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))

    rows: list[dict] = []
    wall: dict[str, float] = {"data": t_data}
    with (out / "degradation.csv").open("w", newline="") as f:
        # Written as it goes: a run killed at a time limit keeps every finished epoch.
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()

        def log_row(row: dict) -> None:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
            f.flush()

        for arch in args.archs:
            t0 = time.perf_counter()
            rows += train_arch(arch, (xtr, ytr), (xte, yte), args, device, log_row)
            wall[arch] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - t_start
    return _summarise(rows, args, machine_name(device), sizes, wall)


if __name__ == "__main__":
    main()

"""Train resnet20_cifar from scratch on cifar10-jpg through the CLI, as a user would.

Measures: test accuracy on the 10,000 lossy-JPEG test images after N epochs, and wall time,
with `resfit train DATA --arch resnet20_cifar --epochs N` and nothing else tuned.
Baseline for the accuracy: the published checkpoint of the same architecture scores 81.03 %
on these JPEGs (after 200 epochs); for the time: N epochs x 50,000 images.

Machine: the project's 2-core Xeon (AVX-512, no bf16), fp32, channels_last.
Last printed (2026-11-28, quiet machine, --epochs 3):
  resnet20_cifar from scratch, 3 epochs on 50000 train images (85 % train / 15 % val)
    test accuracy 0.6860 on 10000 images
    best val accuracy 0.6992 (epoch 3)
    wall time 370 s  (123 s per epoch)

    python bench/train_cifar.py --epochs 3            # ~6 min on 2 cores
    python bench/train_cifar.py --epochs 2 --subset 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ZIP = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "assets"
    / "datasets"
    / "cifar10-jpg.zip"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--subset", type=int, default=0, help="train images to use (0 = all 50,000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not ZIP.exists():
        sys.exit(f"needs {ZIP}")
    work = Path(args.out or tempfile.mkdtemp(prefix="resfit-cifar-"))
    data = work / "data"
    if not data.exists():
        with zipfile.ZipFile(ZIP) as z:
            names = [n for n in z.namelist() if n.endswith(".jpg")]
            if args.subset:
                per_class = args.subset // 10
                keep, seen = [], {}
                for n in names:
                    split, cls = n.split("/")[:2]
                    if split == "train":
                        seen[cls] = seen.get(cls, 0) + 1
                        if seen[cls] > per_class:
                            continue
                    keep.append(n)
                names = keep
            z.extractall(data, members=names)
    run = work / f"run-{int(time.time())}"
    cmd = [sys.executable, "-m", "resfit", "train", str(data), "--out", str(run),
           "--arch", "resnet20_cifar", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--augment", "light", "--no-progress",
           "--leakage", "off"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
    print(
        f"\nresnet20_cifar from scratch, {args.epochs} epochs on {n_train} train images (85 % train / 15 % val)"
    )
    print(f"  test accuracy {summary['test']['accuracy']:.4f} on {summary['test']['n']} images")
    print(f"  best val accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']})")
    print(f"  wall time {wall:.0f} s  ({wall / args.epochs:.0f} s per epoch)")
    print(
        "  reference: the published checkpoint scores 0.8103 on these test JPEGs after 200 epochs"
    )


if __name__ == "__main__":
    main()

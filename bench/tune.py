# resfit tune on a small real task: the CIFAR-10 ResNet-56 checkpoint fine-tuned on flowers5 at
# 32 px (as bench/finetune.py transfer32), a class-balanced subset so that 20 trials fit in
# minutes on 2 cores. The study's first trial is the defaults (the fixed options and nothing
# else: resfit's default lr for the batch, weight decay, smoothing, the standard preset), so
# "best vs defaults" is measured in the same study, on the same images, at the same budget.
#
# Fixed in every trial: --arch resnet56_cifar --weights resnet56-4bfd9763.th --img-size 32
# --recipe finetune --epochs E --batch-size 32 --leakage off. Searched: lr, weight decay,
# label smoothing, augmentation preset and crop strength, MixUp/CutMix, head epochs, the depth
# frozen after the head phase, EMA. --head-only fixes --freeze backbone instead: one feature
# cache serves the whole study, so each trial trains only the head.
#
# Commands (from the repository root, with ../shared/assets present):
#   python bench/tune.py --epochs 15 --timeout 400   # 20 trials, 40 + 30 per class: ~7 min
#   python bench/tune.py --head-only --epochs 10
#   python bench/tune.py --per-class 0 --epochs 15 --trials 20   # all images: hours on 2 cores
#
# Last figures: see the end of this header (filled from the run's printout).
"""`resfit tune --trials 20` on CIFAR ResNet-56 -> flowers5 at 32 px: best vs the defaults."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_summary  # noqa: E402
from finetune import CIFAR56, extract_flowers, subset  # noqa: E402

from resfit.tuning import tune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--per-class", type=int, default=40, help="train images per class (0: all)")
    ap.add_argument("--val-per-class", type=int, default=30, help="val images per class (0: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=None, help="no trial starts after this (s)")
    ap.add_argument("--head-only", action="store_true", help="--freeze backbone: one cache")
    ap.add_argument("--work", default="/tmp/resfit-bench-tune")
    args = ap.parse_args()
    if not CIFAR56.exists():
        sys.exit(f"needs {CIFAR56} (the shared assets)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = Path(args.work)
    root = extract_flowers(work)
    data = subset(root, work / "subset", args.per_class * 5 or None, args.val_per_class * 5 or None)
    out = work / ("study-head" if args.head_only else "study-finetune")
    shutil.rmtree(out, ignore_errors=True)
    fixed = dict(arch="resnet56_cifar", weights=str(CIFAR56), img_size=32, epochs=args.epochs,
                 batch_size=32, leakage="off", progress=False)  # fmt: skip
    fixed.update(freeze="backbone") if args.head_only else fixed.update(recipe="finetune")
    t0 = time.perf_counter()
    r = tune(data, args.trials, out, jobs=args.jobs, timeout=args.timeout, **fixed)
    wall = time.perf_counter() - t0
    c = r.counts
    print(f"\n{machine_summary()}")
    print(f"flowers5 at 32 px ({args.per_class or 'all'} train / {args.val_per_class or 'all'} val "
          f"per class), ResNet-56 CIFAR-10 weights, {'head only' if args.head_only else 'finetune'}, "
          f"{args.epochs} epochs, {args.trials} trials, --jobs {args.jobs}")  # fmt: skip
    print(f"  defaults (trial 0): {100 * (r.defaults_value or 0):.1f} %   best: "
          f"{100 * (r.best_value or 0):.1f} %   ({100 * ((r.best_value or 0) - (r.defaults_value or 0)):+.1f} points)")  # fmt: skip
    print(
        f"  {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed; wall {wall:.0f} s"
    )
    print(f"  best params: {r.best_params}")


if __name__ == "__main__":
    main()

# ResNet-50 training on the CPU: a training step and the data pipeline, naive vs resfit.
#
# step: one SGD step (forward, loss, backward, update) at 224 px, batch 32, from the same
# weights on the same batch: the naive loop (torchvision resnet50, train mode, fp32 NCHW,
# SGD over every parameter) against resfit's TrainStep, the step `resfit train` runs (its
# model and optimizer groups, channels-last, autocast at the precision `auto` picks, plus bf16
# and, with --compile, torch.compile). Medians of interleaved rounds; the first-step losses
# must agree. The figures below were printed before the step moved into TrainStep (the same
# operations, then written out in resfit.apps.benchmark). "% roof":
# images/s x 24.6 GFLOP (forward + backward) over the GEMM roof measured in the same run.
# pipeline: decode + augment images/s on 512 flowers5 training photos at 224 px (the
# "standard" preset): torchvision ImageFolder-style loading with a 0-worker DataLoader (decodes
# every JPEG every epoch) against resfit's decode-once + per-epoch augmentation, and both
# against the images/s resfit's training step consumes (measured first, in the same run).
#
# Last figures, 2 cores of an AMD EPYC (Zen 4, AVX512_BF16), torch 2.14.1, quiet, 2026-11-29
# (python bench/training.py --repeats 5 --compile; roof fp32 196 GFLOP/s, bf16 428):
#   naive torchvision fp32 NCHW (baseline)   2.8 img/s  1.00x  35% roof  first loss 2.7041
#   resfit bf16 channels-last (auto here)   11.5 img/s  4.07x  66%       first loss 2.7117
#   resfit bf16 + torch.compile             11.6 img/s  4.10x  67%       first loss 2.7034
#   pipeline: naive 317.3 img/s, resfit decode once 1105.4, augment per epoch 274.6 (0.87x
#   naive), i.e. 23.7x what the step consumes. (`resfit bench all --compile` the same morning:
#   step 4.22x, pipeline 27.6x.)
# The project's 2-core Xeon (AVX-512 + VNNI, no AVX512_BF16/AMX), torch 2.14.1:
# Last figures (python bench/training.py --repeats 5 --compile, quiet, 2026-11-28; roof fp32
# 305 GFLOP/s, bf16 60):
#   naive torchvision fp32 NCHW (baseline)   3.1 img/s  1.00x  25% roof  first loss 2.7041
#   resfit fp32 channels-last                4.2 img/s  1.38x  34%       first loss 2.7041
#   resfit bf16 autocast channels-last       2.1 img/s  0.68x  84%       first loss 2.7117
#   resfit fp32 + torch.compile              5.0 img/s  1.63x  40%  (72 s to compile)
#   pipeline (with the same augmentation on both sides, `resfit bench pipeline`): naive 313.9
#   img/s, resfit decode once 487.2, resfit augment per epoch 287.0 (0.91x naive), i.e. 57x
#   what the compiled step consumes.
"""Benchmark: ResNet-50 training step and data pipeline, naive loop vs resfit."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from _common import FLOWERS_ZIP

from resfit.apps.benchmark.pipeline import bench_pipeline
from resfit.apps.benchmark.train import bench_train_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per engine")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row")
    ap.add_argument("--limit", type=int, default=512, help="pipeline: flowers5 images")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    step = bench_train_step(
        "resnet50", batch=args.batch, repeats=args.repeats, compile=args.compile
    )
    print(step.format(), flush=True)
    rate = max(r.images_per_s for r in step.rows if r.name.startswith("resfit"))
    print(f"\nresfit's step consumes {rate:.1f} images/s\n", flush=True)

    if not FLOWERS_ZIP.exists():
        print(f"pipeline skipped: needs {FLOWERS_ZIP} (the shared assets)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="resfit-bench-"))
    try:
        with zipfile.ZipFile(FLOWERS_ZIP) as z:
            z.extractall(work / "flowers5")
        pipe = bench_pipeline(
            work / "flowers5", limit=args.limit, batch=args.batch, consumer_images_per_s=rate
        )
        print(pipe.format())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

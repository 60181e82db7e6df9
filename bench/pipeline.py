"""Benchmark: the data modes of `resfit train` (stream, shards, memory) against the ResNet-50 step.

Measures, on real flowers5 photos (about 320x240 JPEGs) at 224 px with the "standard"
augmentation and batch 32: images/s of stream mode (every image decoded + augmented every
epoch in the DataLoader workers), of shards (the same from what `resfit prepare` wrote) and
of memory mode (decoded once in threads, its decoding counted, then augmented in the
workers) over 2 epochs, at 1 and 2 workers, the peak RSS of
the process tree during each (a sum over processes: shared pages count once per worker, an
upper bound), and each rate over what resfit's ResNet-50 train step consumes on this machine
(measured first, in the same run; bf16 autocast, channels-last). Stream must keep up with the
step with at least 2x to spare.

Memory vs stream, same accuracy (python bench/pipeline.py --accuracy: resnet20_cifar, 32 px,
4 epochs, batch 64, "standard" augmentation, 200 CIFAR-10 photos per class with 15% carved out
for validation (300 images), seeds 0-2; same machine, 2026-11-29). Best val accuracy:
  memory: mean 0.3233 sd 0.0436 (0.3033, 0.3733, 0.2933)
  stream: mean 0.3511 sd 0.0500 (0.3533, 0.4000, 0.3000)
The difference (0.028) is below one standard deviation of either mode. The two modes train on
the same pixels and batches. Only the augmentation draws differ (stream seeds each image;
memory draws from the process's generator). Without random augmentation the two modes train
the same weights to fp32 (tests/test_stream.py).

Last figures (python bench/pipeline.py, 2 cores of an Intel Xeon with AMX + AVX512_BF16,
torch 2.14.1, litdata 0.2.76, 2026-12-05). Baseline: resfit's ResNet-50 step measured in the
same run (bf16 autocast, channels-last, batch 32) consumes 18.1 images/s. 512 flowers5
photos, 2 epochs; resfit prepare wrote them in 0.8 s (670 images/s, once, not in the rates):
  stream, 1 worker    211.5 img/s  11.7x the step   peak PSS 0.85 GB (RSS summed 1.30)
  stream, 2 workers   278.9 img/s  15.5x the step   peak PSS 1.09 GB (RSS summed 1.80)
  shards, 1 worker    203.3 img/s  11.3x the step   peak PSS 0.96 GB (RSS summed 1.31)
  shards, 2 workers   298.3 img/s  16.5x the step   peak PSS 1.11 GB (RSS summed 1.82)
  memory, 1 worker    264.1 img/s  14.6x the step   peak PSS 1.03 GB (RSS summed 1.66)
  memory, 2 workers   363.5 img/s  20.1x the step   peak PSS 1.20 GB (RSS summed 2.75)
Stream and shards keep up with the step with 11x to spare on one worker. Memory's peak grows
with the data (0.26 MB a photo: 24 GB for 100,000, see stream_100k.py); stream's and shards'
do not. Worker start-up is in the rates, as a run pays it every epoch. (Earlier figures on
2 cores of an AMD EPYC Zen 4: stream 163.5/236.6, memory 234.3/295.5 img/s at 1/2 workers,
step 11.7 img/s.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from _common import ASSETS, FLOWERS_ZIP

from resfit.apps.benchmark.pipeline import bench_sources

CIFAR_ZIP = ASSETS / "datasets" / "cifar10-jpg.zip"


def accuracy(seeds: tuple[int, ...] = (0, 1, 2), per_class: int = 200, epochs: int = 4) -> None:
    """The same small run in memory and in stream mode, per seed: the best val accuracy."""
    import statistics

    from resfit.training import train

    work = Path(tempfile.mkdtemp(prefix="resfit-acc-"))
    try:
        with zipfile.ZipFile(CIFAR_ZIP) as z:
            names = sorted(n for n in z.namelist() if n.startswith("train/") and n.endswith(".jpg"))
            taken: dict[str, int] = {}
            for n in names:  # the first per_class photos of each class
                cls = n.split("/")[1]
                if taken.get(cls, 0) < per_class:
                    taken[cls] = taken.get(cls, 0) + 1
                    z.extract(n, work)
        scores: dict[str, list[float]] = {"memory": [], "stream": []}
        for seed in seeds:
            for mode in scores:
                r = train(data=str(work / "train"), out=str(work / f"{mode}{seed}"),
                          data_mode=mode, arch="resnet20_cifar", img_size=32, epochs=epochs,
                          batch_size=64, seed=seed, progress=False, report=False,
                          leakage="off")  # fmt: skip
                scores[mode].append(r.best_val_accuracy)
                print(f"seed {seed} {mode}: best val accuracy {r.best_val_accuracy:.4f}",
                      flush=True)  # fmt: skip
        for mode, v in scores.items():
            print(f"{mode}: mean {statistics.mean(v):.4f} sd {statistics.stdev(v):.4f} "
                  f"({', '.join(f'{x:.4f}' for x in v)})")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _step_rate(batch: int) -> float:
    """Images/s of resfit's ResNet-50 step, measured in a child process: the memory it
    allocates would otherwise stay in this one and in the peaks measured after it."""
    code = ("from resfit.apps.benchmark.train import bench_train_step as b; r = b('resnet50', batch="
            f"{batch}, repeats=2); print(max(x.images_per_s for x in r.rows "
            "if x.name.startswith('resfit')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=512, help="flowers5 training images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--step-rate", type=float, help="images/s of the step (skip measuring it)")
    ap.add_argument("--accuracy", action="store_true",
                    help="instead: the same small CIFAR-10 run in memory and stream mode, 3 seeds")  # fmt: skip
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.accuracy:
        accuracy()
        return 0
    if not FLOWERS_ZIP.exists():
        print(f"skipped: needs {FLOWERS_ZIP} (the shared assets)")
        return 0
    rate = args.step_rate if args.step_rate is not None else _step_rate(args.batch)
    print(f"resfit's ResNet-50 step consumes {rate:.1f} images/s\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="resfit-bench-"))
    try:
        with zipfile.ZipFile(FLOWERS_ZIP) as z:
            z.extractall(work / "flowers5")
        report = bench_sources(work / "flowers5", limit=args.limit, batch=args.batch,
                               epochs=args.epochs, consumer_images_per_s=rate)  # fmt: skip
        print(report.format())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

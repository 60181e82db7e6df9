# ResNet-50 inference on the CPU: what each resfit engine buys over plain torchvision.
#
# Measures, in one run and on the same input batch (32 real flowers5 photos at 224 px when
# ../shared is present): batch-32 throughput (images/s, median of --repeats) and batch-1
# latency (ms, median) for torchvision eager fp32 (the baseline) and resfit's engines: the
# fp32 fast path (prepare_for_inference: BN folded, channels-last), the same without BN
# folding, bf16 autocast, torch.compile, ONNX Runtime fp32 and static int8, OpenVINO fp32, bf16
# and int8 (NNCF).
# Each row shows its ratio to the baseline and the fraction of this machine's GEMM roof for its
# precision (measured at the start: n=1024 matmul), at 8.2 GFLOP (4.1 GMACs) per image.
# Slowness never fails the run; an engine that cannot run here is reported and skipped.
#
# Last figures, 2 cores of an Intel Xeon with AMX (AMX-BF16/INT8, AVX512_BF16, VNNI), torch 2.14.1,
# OpenVINO 2026.4.1, quiet, 2026-12-05 (python bench/inference.py --repeats 3):
#   GEMM roof (n=1024 matmul): fp32 382 GFLOP/s, bf16 1510 GFLOP/s, int8 3600 GOP/s
#                                            images/s x base % roof   b1 ms b1 / base top-1 agree setup s
#   torchvision fp32 (baseline)                  12.5   1.00    27%    50.5      1.00      100.0%     3.7
#   resfit fp32 (BN folded, channels-last)       24.5   1.96    52%    42.4      0.84      100.0%     1.2
#   resfit bf16 autocast                         64.2   5.15    35%    26.8      0.53      100.0%     0.6
#   resfit bf16 + torch.compile                 123.7   9.93    67%    21.4      0.42      100.0%    34.6
#   ONNX Runtime fp32                            41.7   3.34    89%    29.9      0.59      100.0%     6.0
#   ONNX Runtime int8                           122.2   9.81    28%    26.8      0.53      100.0%     9.1
#   OpenVINO fp32                                39.5   3.17    85%    47.1      0.93      100.0%     3.1
#   OpenVINO bf16                               216.0  17.33   117%     7.1      0.14      100.0%     2.3
#   OpenVINO int8                               415.9  33.38    94%     4.9      0.10      100.0%     8.0
#   baseline 12.5 img/s; fastest: OpenVINO int8 415.9 img/s = 33.38x; lowest batch-1 latency: OpenVINO int8 4.9 ms = 0.10x the baseline's
# Earlier, 2 cores of an AMD EPYC (Zen 4: AVX-512, VNNI, AVX512_BF16), torch 2.14.1, ONNX
# Runtime 1.32, quiet, 2026-11-29 (python bench/inference.py --repeats 5):
#   GEMM roof (n=1024 matmul): fp32 198 GFLOP/s, bf16 436 GFLOP/s, int8 857 GOP/s
#                                            images/s x base % roof   b1 ms b1 / base top-1 agree setup s
#   torchvision fp32 (baseline)                  11.0   1.00    45%   120.4      1.00      100.0%     2.8
#   resfit fp32 (BN folded, channels-last)       18.2   1.66    75%    65.3      0.54      100.0%     2.1
#   resfit bf16 autocast                         41.1   3.75    77%    40.4      0.34      100.0%     1.1
#   resfit bf16 + torch.compile                  45.6   4.16    86%    38.5      0.32      100.0%    53.4
#   ONNX Runtime fp32                            25.7   2.35   106%    50.7      0.42      100.0%     9.7
#   ONNX Runtime int8                            80.8   7.37    77%    29.6      0.25      100.0%    10.6
# (`resfit bench all --compile` the same morning: 9.8 baseline, compiled bf16 4.22x, int8 8.35x.)
# With the OpenVINO rows, after batch-1 calls moved to a static-shape model, the same Zen 4,
# python bench/inference.py --quick --no-onnx, 2026-11-29 14:05 UTC (GEMM roof fp32 182, bf16
# 404, int8 776: the machine a little slower than the run above):
#                                            images/s x base % roof   b1 ms b1 / base top-1 agree setup s
#   torchvision fp32 (baseline)                  12.1   1.00    54%    76.7      1.00      100.0%     3.3
#   resfit fp32 (BN folded, channels-last)       17.6   1.46    79%    69.9      0.91      100.0%     2.1
#   resfit bf16 autocast                         37.0   3.07    75%    44.8      0.58      100.0%     1.1
#   OpenVINO fp32                                25.2   2.09   113%    45.4      0.59      100.0%     4.4
#   OpenVINO bf16                                48.3   4.01    98%    22.0      0.29      100.0%     3.9
#   OpenVINO int8                                97.8   8.11   103%    12.6      0.16      100.0%     9.3
# (int8 batch-1 was 0.19x with the dynamic-batch model; the 12x / 0.15x targets were set on AMX.)
# The project's 2-core Xeon (AVX-512 + VNNI, no AVX512_BF16/AMX), quiet:
# Last figures (python bench/inference.py --repeats 5, 2026-11-28):
#   GEMM roof (n=1024 matmul): fp32 312 GFLOP/s, bf16 61 GFLOP/s, int8 1334 GOP/s
#                                            images/s x base % roof   b1 ms b1 / base top-1 agree setup s
#   torchvision fp32 (baseline)                  15.6   1.00    41%   107.0      1.00      100.0%     2.6
#   resfit fp32 (BN folded, channels-last)       23.1   1.48    60%    50.1      0.47      100.0%     1.9
#   resfit bf16 autocast                          7.1   0.45    94%   166.7      1.56      100.0%     5.0
#   resfit fp32 + torch.compile                  25.6   1.64    67%    47.5      0.44      100.0%     7.3
#   ONNX Runtime fp32                            34.9   2.23    91%    37.1      0.35      100.0%     9.1
#   ONNX Runtime int8                            88.6   5.67    54%    33.4      0.31      100.0%     8.9
# For contrast, 2 threads of a Sapphire Rapids host (AMX; torch 2.11, ORT 1.30), --quick:
# baseline 11.4, fold+CL 18.3 (1.61x), bf16 68.6 (6.0x), ONNX fp32 29.4 (2.6x), int8 96.9 (8.5x).
"""Benchmark: ResNet-50 inference throughput and latency, baseline vs resfit engines."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from _common import flowers_batch

from resfit.apps.benchmark.inference import bench_inference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="timed batch rounds per engine")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's default")
    ap.add_argument("--quick", action="store_true", help="2 repeats, no torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow start)")
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    real = flowers_batch(args.batch)
    report = bench_inference(
        "resnet50",
        images=torch.from_numpy(real) if real is not None else None,
        batch=args.batch,
        repeats=2 if args.quick else args.repeats,
        compile=not (args.quick or args.no_compile),
        onnx=not args.no_onnx,
    )
    report.info["input"] = "real flowers5 photos" if real is not None else "random"
    print(report.format())
    rows = [r for r in report.rows if r.images_per_s == r.images_per_s]
    base, best = rows[0], max(rows, key=lambda r: r.images_per_s)
    fastest_b1 = min(rows, key=lambda r: r.latency_ms)
    print(
        f"\nbaseline {base.images_per_s:.1f} img/s; fastest: {best.name} {best.images_per_s:.1f} "
        f"img/s = {best.ratio:.2f}x; lowest batch-1 latency: {fastest_b1.name} "
        f"{fastest_b1.latency_ms:.1f} ms = {fastest_b1.latency_ratio:.2f}x the baseline's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

# ResNet-50 inference on the CPU: what each resfit engine buys over plain torchvision.
#
# Measures, in one run and on the same input batch (32 real flowers5 photos at 224 px when
# ../shared is present): batch-32 throughput (images/s, median of --repeats) and batch-1
# latency (ms, median) for torchvision eager fp32 (the baseline) and resfit's engines: the
# fp32 fast path (prepare_for_inference: BN folded, channels-last), the same without BN
# folding, bf16 autocast, torch.compile, ONNX Runtime fp32 and ONNX Runtime static int8.
# Each row shows its ratio to the baseline and the fraction of this machine's GEMM roof for its
# precision (measured at the start: n=1024 matmul), at 8.2 GFLOP (4.1 GMACs) per image.
# Slowness never fails the run; an engine that cannot run here is reported and skipped.
#
# Machine: the project's 2-core Xeon (AVX-512 + VNNI, no AVX512_BF16/AMX), torch 2.14.1, ONNX
# Runtime 1.32, shared with three other jobs while it ran: the GEMM roof it measured (fp32 90-95
# GFLOP/s) is a third of the quiet figure (~261), so absolute numbers are low and noisy and
# "% roof" can pass 100 %. The ratios come from interleaved rounds on the same input and held
# across runs; to be re-run on a quiet machine.
#
# Last figures (python bench/inference.py --repeats 3, 2026-11-27):
#   GEMM roof (n=1024 matmul): fp32 90 GFLOP/s, bf16 29 GFLOP/s, int8 95 GOP/s (after: 95/29/90)
#   engine                                  img/s  x base  % roof    b1 ms   b1 x setup s
#   torchvision eager fp32 (baseline)         6.8    1.00     59%    632.1   1.00     7.2
#   resfit fp32 (fold BN, channels-last)      8.8    1.30     76%    573.0   1.10     7.0
#   resfit fp32 channels-last, no fold        7.0    1.03     60%    394.8   1.60     6.8
#   resfit bf16 autocast                      3.0    0.44     83%    225.8   2.80    13.9
#   resfit fp32 torch.compile                 8.2    1.21     71%     80.5   7.85    12.5
#   ONNX Runtime fp32                        11.8    1.74    102%     79.5   7.95     9.8
#   ONNX Runtime int8                        27.9    4.11    242%     59.7  10.59    15.2
# An earlier run the same day, less loaded (roof fp32 159): baseline 16.1 img/s, fold+CL 18.6
# (1.15x), no fold 15.9, bf16 6.7 (0.41x), compile 23.1 (1.43x; 54 s first compile), ONNX fp32
# 28.3 (1.75x), ONNX int8 87.8 (5.44x). Batch-1 latencies of the PyTorch rows swing 5x between
# runs under load (OpenMP threads wait on busy cores); ONNX Runtime's are steadier.
# For contrast, 2 threads of a Sapphire Rapids host (AMX; torch 2.11, ORT 1.30) with --quick: baseline 11.4, fold+CL
# 18.3 (1.61x), bf16 68.6 (6.0x: native bf16, so `auto` picks it there), ONNX fp32 29.4 (2.6x),
# ONNX int8 96.9 (8.5x).
"""Benchmark: ResNet-50 inference throughput and latency, baseline vs resfit engines."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from _common import flowers_batch

from resfit.benchmark import bench_inference


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

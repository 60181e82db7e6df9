"""The ``resfit bench`` command line: its parser, built without importing torch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ...core.config import OPTIONS
from ...core.presets import AUGMENT_CHOICES
from ..commands import BENCH_PARTS, cmd_bench


def add_bench_parser(sub: Any, add_threads: Callable[[argparse.ArgumentParser], None]) -> None:
    """``resfit bench``: its arguments (``add_threads`` is the CLI's ``--threads``, passed in so
    that imports flow one way)."""
    p = sub.add_parser(
        "bench", help="time inference engines, a training step and the data pipeline here"
    )
    p.add_argument("what", nargs="?", default="all", choices=BENCH_PARTS)
    p.add_argument("run", nargs="?", help="deploy: the run folder whose exports to measure")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--weights", help="inference: weights to load (default: seeded random init)")
    p.add_argument(
        "--data",
        help="image folder: real inputs for inference; needed by pipeline; "
        "deploy: labelled images (default: the run's validation split)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, help="default: the architecture's (224, CIFAR 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is shown)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (slow start)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime engines")
    p.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO engines")
    p.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT engines (GPU)")
    p.add_argument("--augment", default=OPTIONS["augment"].default, choices=AUGMENT_CHOICES)
    p.add_argument(
        "--limit", type=int, default=512, help="pipeline: images to read; deploy: validation images"
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda")
    p.add_argument("--json", help="also write the figures to this file")
    add_threads(p)
    p.set_defaults(func=cmd_bench)

"""The small-device runtimes on this machine: ExecuTorch (``.pte``, XNNPACK), LiteRT
(``.tflite``) and NCNN (``.param``/``.bin``), each running the file ``resfit export --format F``
wrote, as :class:`~resfit.inference.engines.Engine` (``resfit predict --engine executorch``).

Each runner takes float32 NCHW batches preprocessed like training inputs and returns fp32
logits; the files hold a static batch of 1 (what a phone or a board runs), so a batch is run
one image at a time. ``threads`` sets the runtime's own thread count (1: one core; ``None``:
every core), which is what ``resfit bench deploy`` times. The runtimes are optional
(``pip install 'resfit[edge]'``) and imported only when a runner is made.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, MissingExtraError, RunError
from ..core.threads import available_cpus
from ..runs import EDGE_FILES, RunPaths

__all__ = ["EDGE_RUNTIMES", "EdgeEngine", "edge_runner", "make_edge"]

# The module each runtime imports (the registry's `requires=`).
EDGE_RUNTIMES = {"executorch": "executorch", "litert": "ai_edge_litert", "ncnn": "ncnn"}


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module.split(".")[0], "edge") from None


def _all_threads() -> int:
    return available_cpus()  # the cgroup's quota and RESFIT_CPUS too


class ExecutorchRunner:
    """A ``.pte`` program in the ExecuTorch runtime (its XNNPACK delegate on the CPU).

    XNNPACK's thread pool is one per process, and a loaded method keeps a pointer to the pool
    it was loaded with: so the pool is sized *before* the method is loaded, and a runner whose
    pool was resized since (another runner with another thread count) loads its method again
    rather than run on a freed pool."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        runtime = _import("executorch.runtime")
        self.path, self.threads = path, threads or _all_threads()
        self._pool = _import("executorch.extension.pybindings.portable_lib")
        self.program = runtime.Runtime.get().load_program(str(path))
        self.method: Any = None
        self._generation = -1

    def _ready(self) -> Any:
        global _POOL_GENERATION
        if self._pool._threadpool_get_thread_count() != self.threads:
            self.method = None  # the delegate bound to the old pool goes first
            self._pool._unsafe_reset_threadpool(self.threads)
            _POOL_GENERATION += 1
        if self.method is None or self._generation != _POOL_GENERATION:
            self.method = None
            self.method = self.program.load_method("forward")
            self._generation = _POOL_GENERATION
        return self.method

    def __call__(self, x: np.ndarray) -> np.ndarray:
        method = self._ready()
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return np.concatenate([method.execute([t[i : i + 1]])[0].numpy() for i in range(len(t))])


_POOL_GENERATION = 0  # bumped at each resize of ExecuTorch's process-wide thread pool


class LiteRtRunner:
    """A ``.tflite`` model in the LiteRT interpreter (XNNPACK delegate); a fully-int8 model's
    int8 input and output are (de)quantized here with the scales stored in the file."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        interpreter = _import("ai_edge_litert.interpreter")
        self.path, self.threads = path, threads or _all_threads()
        self.it = interpreter.Interpreter(model_path=str(path), num_threads=self.threads)
        self.it.allocate_tensors()
        self.inp, self.out = self.it.get_input_details()[0], self.it.get_output_details()[0]

    def _one(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.inp["quantization"]
        if self.inp["dtype"] != np.float32:  # full-integer I/O
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.inp["dtype"])
        self.it.set_tensor(self.inp["index"], x)
        self.it.invoke()
        y = self.it.get_tensor(self.out["index"])
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return np.asarray(y, dtype=np.float32).copy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self._one(x[i : i + 1]) for i in range(len(x))])


class NcnnRunner:
    """An NCNN ``.param``/``.bin`` pair (pnnx names the blobs ``in0`` and ``out0``)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ncnn = _import("ncnn")
        self.ncnn, self.path, self.threads = ncnn, path, threads or _all_threads()
        self.net = ncnn.Net()
        self.net.opt.num_threads = self.threads
        bin_path = path.with_suffix(".bin")
        if self.net.load_param(str(path)) != 0 or self.net.load_model(str(bin_path)) != 0:
            raise RunError(f"{path} (with {bin_path.name}) is not an NCNN model NCNN can load")

    def _one(self, chw: np.ndarray) -> np.ndarray:
        ex = self.net.create_extractor()
        ex.input("in0", self.ncnn.Mat(np.ascontiguousarray(chw)))
        _, out = ex.extract("out0")
        return np.array(out, dtype=np.float32).reshape(1, -1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return np.concatenate([self._one(x[i]) for i in range(len(x))])


_RUNNERS = {"executorch": ExecutorchRunner, "litert": LiteRtRunner, "ncnn": NcnnRunner}


def edge_runner(format: str, path: Path, threads: int | None = None) -> Any:
    """The runner of ``format`` for the file at ``path``: ``runner(batch) -> logits``."""
    if format not in _RUNNERS:
        raise ConfigError(
            f"no runtime here for {format}: {', '.join(_RUNNERS)} run on this machine"
        )
    if not path.is_file():
        raise RunError(f"{path} is missing: run `resfit export RUN --format {format}` first")
    return _RUNNERS[format](path, threads)


class EdgeEngine:
    """An exported small-device file in its own runtime, as an :class:`Engine` on tensors."""

    def __init__(self, format: str, path: Path, precision: str, threads: int | None) -> None:
        self.name, self.precision = format, precision
        self.device = torch.device("cpu")
        self.runner = edge_runner(format, path, threads)

    def __call__(self, batch: Tensor) -> Tensor:
        x = batch.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.runner(x)).float()

    def describe(self) -> str:
        return f"{self.name} on CPU ({self.precision}, {self.runner.path.name}, {self.runner.threads} threads)"


def make_edge(format: str, run_dir: Path | None, model: nn.Module | None, *, device: str,
              precision: str, compile: bool, threads: int | None = None) -> EdgeEngine:  # fmt: skip
    """The engine factory of ``--engine executorch|litert|ncnn``: RUN/export/F/model.* (int8
    with ``--precision int8``)."""
    if compile:
        raise ConfigError(f"--compile applies to --engine torch, not to {format}")
    if str(device) not in ("auto", "cpu"):
        raise ConfigError(f"--engine {format} runs on the CPU here, not --device {device}")
    want = "fp32" if precision == "auto" else precision
    if (format, want) not in EDGE_FILES:
        done = [p for f, p in EDGE_FILES if f == format]
        raise ConfigError(
            f"--engine {format} runs {' or '.join(done)}, not --precision {precision}"
        )
    if run_dir is None:
        raise TypeError(f"the {format} engine runs a file of RUN/export/{format}: pass run_dir=")
    path = RunPaths(run_dir).edge(format, want)
    if not path.is_file():
        flag = " --int8 --calib DATA" if want == "int8" else ""
        raise RunError(
            f"{path} is missing: run `resfit export {run_dir} --format {format}{flag}` first"
        )
    return EdgeEngine(format, path, want, threads)

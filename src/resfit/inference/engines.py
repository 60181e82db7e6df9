"""Inference engines: one interface for every runtime that turns an image batch into logits.

An :class:`Engine` takes a preprocessed float batch (N, C, H, W) and returns fp32 logits on the
CPU, whatever it runs on. :class:`~resfit.inference.predictor.Predictor` and ``resfit predict --engine``
pick one by name through the registry, so the code that decodes, batches and labels images
never asks which runtime it has:

    engine = create_engine("onnx", "RUN", model, precision="int8")
    logits = engine(batch)

Built in:
- ``torch``: PyTorch with BN folded into the convolutions, channels-last and autocast
  (:func:`resfit.inference.folding.prepare_for_inference`), optionally ``torch.compile``; CPU or GPU.
- ``onnx``: ONNX Runtime on the CPU, running ``RUN/export/model.onnx`` (fp32) or
  ``model.int8.onnx`` (``precision="int8"``), both written by ``resfit export``. Needs the
  optional ``onnxruntime`` (``pip install 'resfit[export]'``).
- ``openvino``: OpenVINO on x86 CPUs (:mod:`resfit.inference.openvino`).
- ``tensorrt``: TensorRT on NVIDIA GPUs through ONNX Runtime's TensorRT provider, fp16 by
  default, fp32, or int8 from ``resfit export --format tensorrt --int8``
  (:mod:`resfit.inference.tensorrt`; ``pip install 'resfit[tensorrt]'``).

Adding an engine (OpenVINO, TensorRT ...) is one call, at the end of this module for a built-in
one or anywhere for a plug-in::

    register_engine("openvino", make_openvino, requires=("openvino",), extra="openvino")

The factory is called as ``factory(run_dir, model, device=..., precision=..., compile=...,
**options)`` and returns an object with the :class:`Engine` attributes.

Imports only :mod:`resfit.runtime` and the error types: :mod:`resfit.export` builds on this
module, never the other way round.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from ..core import runtime
from ..core.errors import ConfigError, MissingExtraError, ResfitError, RunError
from ..core.registry import Registry
from ..runs import RunPaths
from . import folding

__all__ = [
    "ONNX_METADATA_KEY",
    "Engine",
    "EngineFactory",
    "OnnxClassifier",
    "OnnxEngine",
    "TorchEngine",
    "available_engines",
    "choose_engine",
    "create_engine",
    "register_engine",
]

log = logging.getLogger("resfit")

# Key of the JSON preprocessing/labels record in an exported ONNX file's metadata.
ONNX_METADATA_KEY = "resfit"


@runtime_checkable
class Engine(Protocol):
    """What every inference engine offers.

    ``name`` is its registry name, ``precision`` the resolved numeric precision it runs
    (``fp32``, ``bf16``, ``fp16``, ``int8``; never ``auto``) and ``device`` where it runs.
    Calling it on a preprocessed float batch returns fp32 logits (N, classes) on the CPU.
    """

    name: str
    precision: str
    device: torch.device

    def __call__(self, batch: Tensor) -> Tensor: ...

    def describe(self) -> str:
        """One line for logs and reports: runtime, device, precision and what was applied."""
        ...


class EngineFactory(Protocol):
    def __call__(
        self,
        run_dir: Path | None,
        model: nn.Module | None,
        *,
        device: str,
        precision: str,
        compile: bool,
        **options: Any,
    ) -> Engine: ...


@dataclass(frozen=True)
class _Registered:
    factory: EngineFactory
    requires: tuple[str, ...]  # modules the engine imports; missing ones make it unavailable
    extra: str | None  # the pip extra that installs them


ENGINES: Registry[str, _Registered] = Registry("inference engine")


def register_engine(
    name: str,
    factory: EngineFactory,
    *,
    requires: Sequence[str] = (),
    extra: str | None = None,
    replace: bool = False,
) -> None:
    """Make an engine available under ``name`` (``--engine NAME``).

    ``requires`` names the modules it needs: while one is missing the engine is left out of
    :func:`available_engines`, and asking for it raises :class:`MissingExtraError` with the
    install command for ``extra`` (or a :class:`ConfigError` when there is no extra).
    """
    ENGINES.register(name, _Registered(factory, tuple(requires), extra), replace=replace)


def _missing_module(requires: Sequence[str]) -> str | None:
    for module in requires:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):  # a parent package missing, or a stubbed-out module
            return module
    return None


def available_engines() -> list[str]:
    """Names of the registered engines whose dependencies are installed, in registry order."""
    return [n for n, r in ENGINES.items() if _missing_module(r.requires) is None]


def choose_engine(
    run_dir: str | os.PathLike | None,
    *,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
) -> tuple[str, str]:
    """``--engine auto``: the fastest installed engine for this run that keeps its accuracy
    (int8 only when ``precision="int8"`` asks for it), and the reason, for the log.

    The rule, measured on ResNet-50 at 224 px against torchvision eager fp32 on a 2-core Zen 4
    (README, "OpenVINO"): OpenVINO fp32 2.21x and bf16 4.33x against PyTorch's 1.45x and 3.33x, so
    OpenVINO wherever it is installed on an x86 CPU; on a CUDA GPU TensorRT (fp16) where it is
    installed and can run (:func:`resfit.inference.tensorrt.probe`), else PyTorch with autocast;
    PyTorch elsewhere.
    """
    dev = runtime.pick_device(device)
    if dev.type == "cuda":
        return _choose_on_cuda(run_dir, precision, compile)
    if dev.type != "cpu":
        return "torch", f"a {dev.type} device: PyTorch with autocast"
    if compile:
        return "torch", "--compile is the PyTorch engine's"
    export = RunPaths(run_dir).export if run_dir is not None else None
    have = set(available_engines())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
    if precision == "int8":
        if "openvino" in have and export and (export / "openvino" / "model.int8.xml").is_file():
            return "openvino", "the run's OpenVINO int8 export"
        if "onnx" in have and export and (export / "model.int8.onnx").is_file():
            return "onnx", "the run's ONNX int8 export"
        raise RunError(
            f"--precision int8 needs an int8 export of {run_dir or 'the run'}: resfit export "
            f"RUN --format openvino --int8 --calib DATA (or --format onnx --int8 ...)"
        )
    if "openvino" in have and x86:
        return (
            "openvino",
            "an x86 CPU with OpenVINO installed (measured: 4.3x torchvision eager on a Zen 4, "
            "17x on an AMX Xeon; torch 3.3x and 5.2x there)",
        )
    if x86:
        return (
            "torch",
            "OpenVINO is not installed (pip install 'resfit[openvino]': 4.3-17x on the "
            "CPUs measured, against torch's 3.3-5.2x)",
        )
    return "torch", f"a {platform.machine()} CPU"


def _choose_on_cuda(
    run_dir: str | os.PathLike | None, precision: str, compile: bool
) -> tuple[str, str]:
    """``--engine auto`` on a CUDA GPU: TensorRT when it can run here, else PyTorch."""
    if compile:
        return "torch", "--compile is the PyTorch engine's"
    from .tensorrt import FOLDER, INT8_FILE, probe

    usable, why = probe()
    if precision == "int8":
        int8 = RunPaths(run_dir).export / FOLDER / INT8_FILE if run_dir is not None else None
        if usable and int8 is not None and int8.is_file():
            return "tensorrt", f"the run's TensorRT int8 export ({why})"
        raise RunError(
            f"--precision int8 on a GPU runs in TensorRT: resfit export {run_dir or 'RUN'} "
            f"--format tensorrt --int8 --calib DATA" + ("" if usable else f" ({why})")
        )
    if usable and precision in ("auto", "fp16", "fp32"):
        return "tensorrt", f"a CUDA GPU with {why}"
    if usable:
        return "torch", f"--precision {precision} is PyTorch's on a GPU"
    return "torch", f"a CUDA GPU, PyTorch with autocast: TensorRT is not usable ({why})"


def create_engine(
    name: str,
    run_dir: str | os.PathLike | None,
    model: nn.Module | None,
    *,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    **options: Any,
) -> Engine:
    """The engine ``name`` for a run folder and/or its PyTorch model.

    Engines that run an exported file read it from ``run_dir``; the PyTorch engine runs
    ``model``. ``options`` go to the engine's factory (the ONNX engine takes ``threads``).
    """
    auto = name == "auto"
    if auto:
        name, why = choose_engine(run_dir, device=device, precision=precision, compile=compile)
        log.info("engine: %s (%s)", name, why)
    if auto and name == "tensorrt":
        try:
            return _make("tensorrt", run_dir, model, device, precision, compile, options)
        except (ResfitError, RuntimeError, OSError) as e:  # the engine build failed on this GPU
            if precision == "int8":  # asked for: no silent change of precision
                raise
            log.warning("engine: torch (TensorRT failed here: %s)", str(e).splitlines()[0])
            name = "torch"
    return _make(name, run_dir, model, device, precision, compile, options)


def _make(
    name: str,
    run_dir: str | os.PathLike | None,
    model: nn.Module | None,
    device: str,
    precision: str,
    compile: bool,
    options: dict[str, Any],
) -> Engine:
    entry = ENGINES.get(name) if name in ENGINES else None
    if entry is None:
        raise ConfigError(
            f"--engine {name!r} is not an inference engine here; "
            f"available: {', '.join(available_engines())}"
        )
    missing = _missing_module(entry.requires)
    if missing is not None:
        if entry.extra:
            raise MissingExtraError(missing, entry.extra)
        raise ConfigError(
            f"--engine {name} needs {missing}, which is not installed; "
            f"available: {', '.join(available_engines())}"
        )
    run_path = Path(run_dir) if run_dir is not None else None
    return entry.factory(
        run_path, model, device=device, precision=precision, compile=compile, **options
    )


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchEngine:
    """PyTorch's fast path: a BN-folded, channels-last copy of ``model`` under autocast.

    ``model`` itself is left as it was (its weights, device and mode).
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        if precision == "int8":
            raise ConfigError(
                "--precision int8 runs in ONNX Runtime: add --engine onnx "
                "(after resfit export --int8)"
            )
        self.runner = folding.prepare_for_inference(model, device, precision, compile)
        self.device: torch.device = self.runner.device
        self.precision: str = self.runner.precision

    def __call__(self, batch: Tensor) -> Tensor:
        return self.runner(batch).float().cpu()

    def describe(self) -> str:
        steps = ["BN folded" if self.runner.folded else "", "channels-last"]
        steps.append("torch.compile" if self.runner.compiled else "")
        done = ", ".join(s for s in steps if s)
        return f"PyTorch on {runtime.describe(self.device, self.precision)}, {done}"

    def __repr__(self) -> str:
        return f"TorchEngine({self.runner!r})"


def _torch_engine(
    run_dir: Path | None,
    model: nn.Module | None,
    *,
    device: str,
    precision: str,
    compile: bool,
) -> TorchEngine:
    if model is None:
        raise TypeError("the torch engine runs a PyTorch model: pass model=")
    return TorchEngine(model, device=device, precision=precision, compile=compile)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "export") from None
    return onnxruntime


class OnnxClassifier:
    """Run an exported classifier with ONNX Runtime on the CPU, on numpy arrays.

    ``threads`` sets the intra-op threads (default: ONNX Runtime's, one per physical core).
    ``metadata`` is the ``pretrained_cfg`` stored at export (mean, std, input_size,
    categories, precision); ``precision`` is ``"fp32"`` or ``"int8"``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise RunError(
                f"ONNX model {self.path} does not exist: write it with resfit export RUN "
                f"(add --int8 --calib DATA for the int8 model)"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.path), opts, providers=["CPUExecutionProvider"]
        )
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: list[int | str | None] = list(inp.shape)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = json.loads(meta.get(ONNX_METADATA_KEY, "{}"))
        self.precision: str = self.metadata.get("precision", "fp32")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for a float32 NCHW batch preprocessed like training inputs."""
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        want = self.input_shape[1:]
        if x.ndim != 4 or any(
            isinstance(w, int) and w != g for w, g in zip(want, x.shape[1:], strict=False)
        ):
            raise ValueError(
                f"{self.path.name} takes N x {' x '.join(map(str, want))} float32 images, "
                f"got shape {x.shape}"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, precision={self.precision!r})"


class OnnxEngine:
    """An exported ONNX file in ONNX Runtime (CPU), as an :class:`Engine` on tensors."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.session = OnnxClassifier(path, threads=threads)
        self.device = torch.device("cpu")
        self.precision: str = self.session.precision

    def __call__(self, batch: Tensor) -> Tensor:
        x = batch.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.session(x)).float()

    def describe(self) -> str:
        return f"ONNX Runtime on CPU ({self.precision}, {self.session.path.name})"

    def __repr__(self) -> str:
        return f"OnnxEngine({str(self.session.path)!r}, precision={self.precision!r})"


def _onnx_engine(
    run_dir: Path | None,
    model: nn.Module | None,
    *,
    device: str,
    precision: str,
    compile: bool,
    threads: int | None = None,
) -> OnnxEngine:
    if compile:
        raise ConfigError("--compile applies to --engine torch, not to ONNX Runtime")
    if precision not in ("auto", "fp32", "int8"):
        raise ConfigError(
            f"--engine onnx runs fp32 or int8 (after resfit export --int8), "
            f"not --precision {precision}"
        )
    if str(device) not in ("auto", "cpu"):
        raise ConfigError(f"--engine onnx runs on the CPU, not --device {device}")
    if run_dir is None:
        raise TypeError("the onnx engine runs RUN/export/model.onnx: pass run_dir=")
    int8 = precision == "int8"
    path = RunPaths(run_dir).export / ("model.int8.onnx" if int8 else "model.onnx")
    if not path.is_file():
        flag = " --int8 --calib DATA" if int8 else ""
        raise RunError(f"{path} is missing: run `resfit export {run_dir}{flag}` first")
    return OnnxEngine(path, threads=threads)


def _openvino_engine(run_dir: Path | None, model: nn.Module | None, **kw: Any) -> Engine:
    # Imported when asked for: OpenVINO is optional, and the module imports it on use.
    from .openvino import make_openvino

    return make_openvino(run_dir, model, **kw)


def _tensorrt_engine(run_dir: Path | None, model: nn.Module | None, **kw: Any) -> Engine:
    # Imported when asked for: onnxruntime-gpu and TensorRT are optional, imported on use.
    from .tensorrt import make_tensorrt

    return make_tensorrt(run_dir, model, **kw)


# The built-in engines; a new one is registered here the same way.
register_engine("torch", _torch_engine)
register_engine("onnx", _onnx_engine, requires=("onnxruntime",), extra="export")
register_engine("openvino", _openvino_engine, requires=("openvino",), extra="openvino")
# onnxruntime-gpu installs the module onnxruntime; tensorrt-cu13 the module tensorrt.
register_engine(
    "tensorrt", _tensorrt_engine, requires=("tensorrt", "onnxruntime"), extra="tensorrt"
)


def _edge_factory(format: str) -> EngineFactory:
    def factory(run_dir: Path | None, model: nn.Module | None, **kw: Any) -> Engine:
        # Imported when asked for: the small-device runtimes are optional (resfit[edge]).
        from .edge import make_edge

        return make_edge(format, run_dir, model, **kw)

    return factory


# The small-device runtimes, running what `resfit export --format F` wrote (inference/edge.py).
for _name, _module in {"executorch": "executorch", "litert": "ai_edge_litert",
                       "ncnn": "ncnn"}.items():  # fmt: skip
    register_engine(_name, _edge_factory(_name), requires=(_module,), extra="edge")

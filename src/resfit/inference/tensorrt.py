"""TensorRT on NVIDIA GPUs, through ONNX Runtime's TensorRT execution provider.

``--engine tensorrt [--precision fp16|int8|fp32]`` (:func:`make_tensorrt`, registered in
:mod:`resfit.inference.engines`) runs the run's ONNX model in TensorRT: ``RUN/export/model.onnx`` when
``resfit export`` wrote one, else the run's PyTorch model exported now and kept in resfit's
cache (keyed by a fingerprint of its weights, :func:`onnx_for`). ``int8`` runs
``RUN/export/tensorrt/model.int8.onnx``, a QDQ model with symmetric int8 activations and
weights (what TensorRT takes; the CPU int8 file has uint8 activations, which it refuses),
written by ``resfit export RUN --format tensorrt --int8 --calib DATA`` with the same
calibration, parity and accuracy checks as the ONNX and OpenVINO paths.

Why ONNX Runtime's provider and not torch-tensorrt: it reuses the ONNX export and the int8
QDQ calibration resfit already has (torch-tensorrt's int8 needs NVIDIA's model optimizer on
top), and its wheel does not pin a torch build (torch-tensorrt must match torch's version and
CUDA exactly). ``onnxruntime-gpu`` 1.31 is built for CUDA 13 and TensorRT 10 (its provider
library needs ``libnvinfer.so.10``), the CUDA that torch 2.14's wheels bring, so both share
one set of CUDA libraries: ``pip install 'resfit[tensorrt]'``.

TensorRT compiles an engine for the GPU on first use (tens of seconds for a ResNet-50); the
engine and TensorRT's timing cache are kept under ``<resfit cache>/tensorrt/``
(``RESFIT_CACHE_DIR``), one folder per model file content, precision, batch limit and
TensorRT version, so a later process loads the engine instead. Batches run in an optimization
profile from 1 to ``max_batch`` images (64, predict's batch); larger ones are split.

Imports only torch, the error types and resfit's cache root (:mod:`resfit.core.cache`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.atomic import atomic_dir
from ..core.errors import ConfigError, MissingExtraError, RunError
from ..core.hashing import weights_digest
from ..runs import RunPaths, read_saved_config

log = logging.getLogger("resfit")

PROVIDER = "TensorrtExecutionProvider"
FOLDER = "tensorrt"  # RUN/export/tensorrt/ and <resfit cache>/tensorrt/
INT8_FILE = "model.int8.onnx"
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 64
INSTALL = "pip install 'resfit[tensorrt]'"
INPUT_NAME = "input"  # resfit's ONNX exports name their input so


def cache_folder() -> Path | None:
    """``<resfit cache>/tensorrt``: engines, TensorRT's timing cache and ONNX files exported at
    load. None when it cannot be written (then nothing is cached, and nothing fails)."""
    from ..core.cache import cache_dir

    folder = cache_dir() / FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def provider_options(
    precision: str,
    *,
    input_shape: tuple[int, int, int],
    max_batch: int = DEFAULT_MAX_BATCH,
    engine_cache: Path | None = None,
    timing_cache: Path | None = None,
    device_id: int = 0,
    input_name: str = INPUT_NAME,
) -> dict[str, str]:
    """The TensorRT execution provider's options for ``precision`` (fp32, fp16 or int8).

    int8 also enables fp16: TensorRT runs the layers a QDQ model leaves unquantized (the
    classifier head, the softmax-free output) in fp16 rather than fp32. Batches from 1 to
    ``max_batch`` share one engine (an explicit optimization profile, tuned for
    ``max_batch``); with ``engine_cache`` the built engine is kept there.
    """
    if precision not in PRECISIONS:
        raise ConfigError(
            f"--engine tensorrt runs {', '.join(PRECISIONS)}, not --precision {precision}"
        )
    if max_batch < 1:
        raise ConfigError(f"the TensorRT batch limit must be at least 1, not {max_batch}")
    c, h, w = input_shape

    def shape(n: int) -> str:
        return f"{input_name}:{n}x{c}x{h}x{w}"

    options = {
        "device_id": str(device_id),
        "trt_fp16_enable": str(precision in ("fp16", "int8")),
        "trt_int8_enable": str(precision == "int8"),
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(max_batch),
        "trt_profile_max_shapes": shape(max_batch),
        "trt_engine_cache_enable": str(engine_cache is not None),
        "trt_timing_cache_enable": str(timing_cache is not None),
    }
    if engine_cache is not None:
        options["trt_engine_cache_path"] = str(engine_cache)
    if timing_cache is not None:
        options["trt_timing_cache_path"] = str(timing_cache)
    return options


# ---------------------------------------------------------------------------------------------
# Is TensorRT usable here?


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stubbed-out module
        return False


def load_tensorrt_libraries() -> str | None:
    """Load TensorRT's libraries (libnvinfer, its ONNX parser and plugins) into the process, so
    that ONNX Runtime's provider finds them by name: from the ``tensorrt_libs`` wheel when it is
    installed, else from the system's library path. Returns why not, or None when loaded."""
    names: list[str] = []
    if _found("tensorrt_libs"):
        spec = importlib.util.find_spec("tensorrt_libs")
        for where in spec.submodule_search_locations or []:  # type: ignore[union-attr]
            # libnvinfer first: the parser and plugins link against it.
            found = sorted(Path(where).glob("lib*.so*"), key=lambda p: "nvinfer.so" not in p.name)
            names += [str(p) for p in found]
    names = names or ["libnvinfer.so.10", "libnvonnxparser.so.10"]
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            if "nvinfer.so" in name or "nvonnxparser" in name:
                return f"TensorRT's library {Path(name).name} cannot be loaded ({e})"
    return None


def probe() -> tuple[bool, str]:
    """Whether TensorRT can run here, and why (or why not), for ``--engine auto``'s log: a
    CUDA GPU, ONNX Runtime's GPU build with the TensorRT provider, and TensorRT's libraries."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if not _found("onnxruntime") or not _found("tensorrt"):
        return False, f"TensorRT is not installed ({INSTALL})"
    import onnxruntime as ort

    if PROVIDER not in ort.get_available_providers():
        return False, (
            f"this onnxruntime {ort.__version__} is the CPU build, without TensorRT "
            f"(pip uninstall onnxruntime; {INSTALL})"
        )
    reason = load_tensorrt_libraries()
    if reason is not None:
        return False, f"{reason}; {INSTALL}"
    return True, f"TensorRT {_tensorrt_version()} through ONNX Runtime {ort.__version__}"


def _tensorrt_version() -> str:
    try:
        from importlib.metadata import version

        for dist in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt"):
            with contextlib.suppress(Exception):
                return version(dist)
    except ImportError:  # pragma: no cover
        pass
    return "?"


def require_tensorrt() -> None:
    """Raise, in one line, what is missing for TensorRT here and how to install it."""
    if not _found("tensorrt"):
        raise MissingExtraError("tensorrt", "tensorrt")
    if not _found("onnxruntime"):
        raise MissingExtraError("onnxruntime-gpu", "tensorrt")
    ok, why = probe()
    if not ok:
        raise ConfigError(f"--engine tensorrt cannot run here: {why}")


# ---------------------------------------------------------------------------------------------
# The engine


def _file_digest(path: Path, *extra: str) -> str:
    """What a built engine depends on: the model file's bytes and ``extra`` (precision, batch
    limit, TensorRT version). ONNX Runtime's own engine cache names do not follow the weights."""
    h = hashlib.blake2b(digest_size=12)
    for part in extra:
        h.update(part.encode() + b"|")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class TensorRtEngine:
    """An ONNX classifier in TensorRT on one GPU, behind the :class:`~resfit.inference.engines.Engine`
    interface: a float NCHW batch in (CPU or CUDA tensor), fp32 logits out on the CPU."""

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        precision: str,
        *,
        input_shape: tuple[int, int, int],
        max_batch: int = DEFAULT_MAX_BATCH,
        device_id: int = 0,
        cache: bool = True,
        source: str = "",
    ) -> None:
        require_tensorrt()
        import onnxruntime as ort

        self.path = Path(onnx_path)
        folder = cache_folder() if cache else None
        version = _tensorrt_version()
        engines = None
        if folder is not None:
            key = _file_digest(self.path, precision, str(max_batch), version)
            engines = folder / "engines" / f"{self.path.stem}-{precision}-{key}"
            engines.mkdir(parents=True, exist_ok=True)
        cached = engines is not None and any(engines.glob("*.engine"))
        opts = provider_options(precision, input_shape=input_shape, max_batch=max_batch,
                                engine_cache=engines, device_id=device_id,
                                timing_cache=folder / "timing" if folder else None)  # fmt: skip
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: the provider logs every subgraph it takes
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(
            str(self.path), so,
            providers=[(PROVIDER, opts), ("CUDAExecutionProvider", {"device_id": device_id})],
        )  # fmt: skip
        if PROVIDER not in self.session.get_providers():
            raise RunError(
                f"ONNX Runtime could not start TensorRT for {self.path.name} (it fell back to "
                f"{', '.join(self.session.get_providers())}); {INSTALL}"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.precision, self.max_batch, self.source = precision, max_batch, source
        self.device = torch.device("cuda", device_id)
        self.versions = f"TensorRT {version}, ONNX Runtime {ort.__version__}"
        self.engine_cache = engines
        self._ort = ort
        what = "read from the cache" if cached else "built"
        log.info("TensorRT %s engine %s in %.1f s", precision, what, time.perf_counter() - t0)

    def _run(self, chunk: Tensor) -> np.ndarray:
        if not chunk.is_cuda:
            x = chunk.detach().to("cpu", torch.float32).contiguous().numpy()
            return self.session.run([self.output_name], {self.input_name: x})[0]
        # On the GPU already: bind its memory, no round trip through the host.
        x = chunk.detach().to(self.device, torch.float32).contiguous()
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index or 0, np.float32,
                           tuple(x.shape), x.data_ptr())  # fmt: skip
        binding.bind_output(self.output_name, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def __call__(self, batch: Tensor) -> Tensor:
        outs = [self._run(batch[i : i + self.max_batch])
                for i in range(0, len(batch), self.max_batch)]  # fmt: skip
        return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False))

    def describe(self) -> str:
        gpu = torch.cuda.get_device_name(self.device)
        return f"TensorRT on {gpu} ({self.precision}; {self.versions}; {self.source})"

    def __repr__(self) -> str:
        return f"TensorRtEngine({str(self.path)!r}, precision={self.precision!r})"


# ---------------------------------------------------------------------------------------------
# The factory: which ONNX file, exported now if need be


def _weights_fingerprint(model: nn.Module, img_size: int, in_chans: int) -> str:
    return weights_digest(model, type(model).__name__, str(img_size), str(in_chans),
                          torch.__version__)  # fmt: skip


def _export(model: nn.Module, path: Path, img_size: int, in_chans: int) -> None:
    """``model`` as ONNX (opset 18, dynamic batch, input ``input``), as ``resfit export`` writes
    it (:func:`resfit.export.onnx.export_onnx`, which this module cannot import: it builds on the
    engines)."""
    if not _found("onnxscript"):
        raise MissingExtraError("onnxscript", "tensorrt")
    import copy

    net = copy.deepcopy(model).float().eval().cpu()
    example = torch.randn(2, in_chans, img_size, img_size)  # batch 2: 1 would be specialised
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), opset_version=18, dynamo=True,
                          external_data=False, input_names=[INPUT_NAME], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip


def onnx_for(model: nn.Module, img_size: int, in_chans: int = 3) -> tuple[Path, str]:
    """An ONNX file of ``model``: exported now, or for the same weights read back from the cache
    (:func:`cache_folder`); and a note of which for :meth:`TensorRtEngine.describe`."""
    folder = cache_folder()
    if folder is None:
        raise RunError("--engine tensorrt without an export needs a writable RESFIT_CACHE_DIR")
    target = folder / "onnx" / _weights_fingerprint(model, img_size, in_chans) / "model.onnx"
    if target.is_file():
        return target, f"exported earlier, {target.parent}"
    t0 = time.perf_counter()
    try:
        with atomic_dir(target.parent, replace=False) as tmp:  # a reader never sees half a file
            _export(model, tmp / "model.onnx", img_size, in_chans)
    except OSError:  # another process got there first
        pass
    if not target.is_file():
        raise RunError(f"could not write {target}: is the disk full?")
    log.info("TensorRT: exported the run's model to ONNX in %.1f s", time.perf_counter() - t0)
    return target, "exported at load"


def _precision(precision: str) -> str:
    if precision == "auto":
        return "fp16"  # the tensor cores' precision; logits within fp16 rounding of fp32
    if precision not in PRECISIONS:
        raise ConfigError(
            f"--engine tensorrt runs {', '.join(PRECISIONS)}, not --precision {precision}"
        )
    return precision


def _device_id(device: str) -> int:
    text = str(device)
    if text in ("auto", "cuda"):
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ConfigError(f"--engine tensorrt runs on an NVIDIA GPU (--device cuda), not {text}")


def make_tensorrt(
    run_dir: Path | None,
    model: nn.Module | None,
    *,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    img_size: int | None = None,
    in_chans: int = 3,
    **_: Any,
) -> TensorRtEngine:
    """The engine factory (see :mod:`resfit.inference.engines`): the run's exported ONNX model, or its
    PyTorch model exported now, in TensorRT."""
    if compile:
        raise ConfigError("--compile is for the torch engine: TensorRT compiles the model itself")
    device_id, prec = _device_id(device), _precision(precision)
    require_tensorrt()
    export = RunPaths(run_dir).export if run_dir is not None else None
    saved = read_saved_config(run_dir) if img_size is None and run_dir is not None else None
    if saved is not None:
        img_size, in_chans = saved.get("img_size"), saved.get("in_chans", in_chans)
    if img_size is None:
        raise RunError("--engine tensorrt needs a run folder or a model with its input size")
    if prec == "int8":
        path = export / FOLDER / INT8_FILE if export else Path(INT8_FILE)
        if not path.is_file():
            raise RunError(
                f"{path} is missing: write it with `resfit export {run_dir or 'RUN'} "
                f"--format tensorrt --int8 --calib DATA`"
            )
        source = str(path)
    elif export is not None and (export / "model.onnx").is_file():
        path, source = export / "model.onnx", str(export / "model.onnx")
    elif model is not None:
        path, source = onnx_for(model, img_size, in_chans)
    else:
        raise RunError("--engine tensorrt needs RUN/export/model.onnx or the run's model")
    return TensorRtEngine(path, prec, input_shape=(in_chans, img_size, img_size),
                          max_batch=max_batch, device_id=device_id, source=source)  # fmt: skip

"""OpenVINO on x86 CPUs: convert a model, quantize it to int8 with NNCF, and run it.

``--engine openvino`` (:func:`make_openvino`, registered in :mod:`resfit.inference.engines`) runs
``RUN/export/openvino/model.int8.xml`` for ``--precision int8`` (written by ``resfit export RUN
--format openvino --int8 --calib DATA``), ``model.xml`` when an fp32 export exists, and
otherwise converts the run's PyTorch model when it loads (2.1 s for a ResNet-50 here) and keeps
the conversion in resfit's cache, keyed by a fingerprint of the weights (:func:`converted`), so
the next process reads it back. Compiled models go to OpenVINO's ``CACHE_DIR`` in the same
cache (compile 0.33 s -> 0.07 s for a ResNet-50 int8).
``auto`` precision is bf16 where the CPU has it natively (AVX512_BF16, AMX), else fp32. The
engine uses this process's share of the cores (``torch.get_num_threads()``) in one stream (the
``latency`` hint): it is called synchronously, one batch at a time, and the ``throughput``
hint's several streams then leave cores idle (measured: int8 4.3x instead of 8.2x here).
Measured on the Zen 4 for ResNet-50 (img/s at batch 64, sync calls unless said): int8 latency
hint 97-100, batch 16 99, batch 8 95, throughput hint with an async queue of 2 requests 99-101,
2 streams async batch 32 98; bf16 50-52 in every one of these. No configuration beats the
latency hint's throughput by more than the noise, and it has the lowest batch-1 latency, so it
stays the default. Batch-1 calls run a static-shape copy (int8 19.4 -> 12.7 ms per image).

Measured by one ``resfit bench inference`` run on 2 quiet cores of a Zen 4 EPYC (AVX512_BF16,
VNNI), ResNet-50 at 224 px, batch 32, against torchvision eager fp32 in the same run: OpenVINO
fp32 2.21x, bf16 4.33x, int8 (NNCF) 8.17x with batch-1 latency 0.19x; PyTorch bf16 3.33x and
ONNX Runtime int8 7.02x in the same run.

Needs the optional packages ``openvino`` and ``nncf``: ``pip install 'resfit[openvino]'``.
Imports only :mod:`resfit.runtime` and the error types.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core import runtime
from ..core.atomic import atomic_dir
from ..core.errors import ConfigError, MissingExtraError, RunError
from ..core.hashing import weights_digest
from ..core.sigstack import mend_signal_stack
from ..runs import RunPaths, read_saved_config

log = logging.getLogger("resfit")

FOLDER = "openvino"  # RUN/export/openvino/
FP32_FILE, INT8_FILE = "model.xml", "model.int8.xml"
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
HINTS = ("throughput", "latency")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise MissingExtraError("openvino", "openvino") from None
    return openvino


_core: Any = None
_core_lock = threading.Lock()


def shared_core() -> Any:
    """This process's one ``ov.Core``, made on first use and kept until the process ends.

    Why one: each Core's CPU plugin swaps the calling thread's alternate signal stack and frees it
    when the Core goes; Cores freed in the order they were made leave a dangling stack and the
    next signal kills the process (:mod:`resfit.core.sigstack`). One Core also loads the plugin
    once (0.1-0.2 s per Core here)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = _openvino().Core()
        return _core


def convert(model: nn.Module, img_size: int, in_chans: int = 3) -> Any:
    """An OpenVINO model of ``model`` (eval mode, a copy) with a dynamic batch dimension."""
    ov = _openvino()
    example = torch.zeros(1, in_chans, img_size, img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # OpenVINO traces with torch.jit
        converted = ov.convert_model(copy.deepcopy(model).float().eval(), example_input=example)
    converted.reshape([-1, in_chans, img_size, img_size])
    return converted


def quantize(ov_model: Any, batches: Iterable[np.ndarray]) -> Any:
    """Post-training int8 quantization with NNCF, calibrated on ``batches`` (preprocessed
    float32 NCHW arrays of the user's images)."""
    try:
        import nncf
    except ImportError:
        raise MissingExtraError("nncf", "openvino") from None
    items = [b[i : i + 1] for b in batches for i in range(len(b))]
    if not items:
        raise ConfigError("int8 calibration needs at least one image")
    try:
        return nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items))
    finally:  # NNCF makes and drops Cores of its own
        mend_signal_stack()


def save(ov_model: Any, path: Path) -> Path:
    """Write ``path`` (.xml) and its weights (.bin) beside it, weights kept in full precision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _openvino().save_model(ov_model, str(path), compress_to_fp16=False)
    return path


def cache_folder() -> Path | None:
    """Where compiled models (OpenVINO's ``CACHE_DIR``) and models converted at load are kept:
    ``<resfit cache>/openvino`` (``RESFIT_CACHE_DIR``, else ``~/.cache/resfit``); None when it
    cannot be written (then nothing is cached, and nothing fails)."""
    from ..core.cache import cache_dir

    folder = cache_dir() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


class OpenVinoEngine:
    """A compiled OpenVINO model behind the :class:`~resfit.inference.engines.Engine` interface.

    ``ov_model`` is an OpenVINO model or the path of an IR (.xml) file; with ``cache`` the
    compiled model is kept in :func:`cache_folder` and a later process loads it instead of
    compiling again (0.33 s -> 0.07 s for a ResNet-50 int8 here). Batches of one run in a
    second, static-shape copy compiled on first use: the dynamic-batch model pays for its
    shape handling on every call (int8 ResNet-50: 19.4 ms -> 12.7 ms per image on the Zen 4).
    """

    name = "openvino"

    def __init__(
        self,
        ov_model: Any,
        precision: str,
        *,
        hint: str = "latency",
        threads: int | None = None,
        source: str = "",
        cache: bool = True,
    ) -> None:
        ov = _openvino()
        if hint not in HINTS:
            raise ConfigError(f"the OpenVINO hint must be one of {', '.join(HINTS)}, not {hint!r}")
        self.config: dict[str, Any] = {
            "PERFORMANCE_HINT": hint.upper(),
            # This process's share of the cores (resfit.core.threads), not the whole machine.
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        }
        if precision in _PRECISION_HINTS:  # int8 models carry their own precision
            self.config["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[precision]
        folder = cache_folder() if cache else None
        if folder is not None:
            self.config["CACHE_DIR"] = str(folder / "compiled")
        self.core = shared_core()
        if isinstance(ov_model, (str, Path)):  # a cached compile skips reading the IR
            self.compiled = self.core.compile_model(str(ov_model), "CPU", self.config)
        else:
            self.compiled = self.core.compile_model(ov_model, "CPU", self.config)
        mend_signal_stack()  # in case Cores made elsewhere (NNCF, the caller) left it dangling
        self._model, self._single = ov_model, None
        self.precision, self.hint, self.source = precision, hint, source
        self.device = torch.device("cpu")
        self.version = ov.__version__.split("-")[0]

    def _for_one(self) -> Any:
        """The static batch-1 compiled model (made on first use)."""
        if self._single is None:
            model = self._model
            model = self.core.read_model(str(model)) if isinstance(model, (str, Path)) else model
            shape = model.input(0).get_partial_shape()
            if shape.rank.is_dynamic or any(d.is_dynamic for d in list(shape)[1:]):
                self._single = self.compiled  # only the batch can be fixed here
            else:
                model = model.clone()
                model.reshape([1, *(d.get_length() for d in list(shape)[1:])])
                self._single = self.core.compile_model(model, "CPU", self.config)
        return self._single

    def __call__(self, batch: Tensor) -> Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        compiled = self._for_one() if len(x) == 1 else self.compiled
        out = compiled(x)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def describe(self) -> str:
        return f"OpenVINO {self.version} on CPU ({self.precision}, {self.hint} hint; {self.source})"


def _precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if runtime.cpu_has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "int8"):
        raise ConfigError(f"--engine openvino runs fp32, bf16 or int8, not {precision!r}")
    return precision


def make_openvino(
    run_dir: Path | None,
    model: nn.Module | None,
    *,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    hint: str = "latency",
    threads: int | None = None,
    img_size: int | None = None,
    in_chans: int = 3,
    **_: Any,
) -> OpenVinoEngine:
    """The engine factory (see :mod:`resfit.inference.engines`): the run's exported OpenVINO model, or
    its PyTorch model converted now."""
    if str(device) not in ("auto", "cpu"):
        raise ConfigError(f"--engine openvino runs on the CPU; --device {device} is for torch")
    if compile:
        raise ConfigError("--compile is for the torch engine: OpenVINO compiles the model itself")
    prec = _precision(precision)
    folder = RunPaths(run_dir).export / FOLDER if run_dir is not None else None
    file = INT8_FILE if prec == "int8" else FP32_FILE
    if folder is not None and (folder / file).is_file():
        return OpenVinoEngine(
            folder / file, prec, hint=hint, threads=threads, source=str(folder / file)
        )
    if prec == "int8":
        raise RunError(
            f"{folder / file if folder else INT8_FILE} is missing: write it with "
            f"`resfit export {run_dir or 'RUN'} --format openvino --int8 --calib DATA`"
        )
    saved = read_saved_config(run_dir) if img_size is None and run_dir is not None else None
    if saved is not None:
        img_size, in_chans = saved.get("img_size"), saved.get("in_chans", in_chans)
    if model is None or img_size is None:
        raise RunError("--engine openvino needs a run folder or a model with its input size")
    ov_model, source = converted(model, img_size, in_chans)
    return OpenVinoEngine(ov_model, prec, hint=hint, threads=threads, source=source)


def _fingerprint(model: nn.Module, img_size: int, in_chans: int) -> str:
    """What a conversion depends on: the weights' bytes, the input and the OpenVINO version
    (blake2b over 100 MB of ResNet-50 weights: 0.1 s, against 2 s for a conversion)."""
    return weights_digest(model, type(model).__name__, str(img_size), str(in_chans),
                          _openvino().__version__)  # fmt: skip


def converted(model: nn.Module, img_size: int, in_chans: int = 3) -> tuple[Any, str]:
    """``model`` as OpenVINO IR, converted now or, for the same weights, read back from the
    cache (:func:`cache_folder`), and a note of which for :meth:`OpenVinoEngine.describe`."""
    folder = cache_folder()
    cached = folder / "converted" / _fingerprint(model, img_size, in_chans) if folder else None
    if cached is not None and (cached / FP32_FILE).is_file():
        return cached / FP32_FILE, f"converted earlier, {cached}"
    t0 = time.perf_counter()
    ov_model = convert(model, img_size, in_chans)
    log.info("OpenVINO: converted the run's model in %.1f s", time.perf_counter() - t0)
    if cached is not None:
        # Written beside and renamed into place: a reader never sees half a model.
        try:
            with atomic_dir(cached, replace=False) as tmp:
                save(ov_model, tmp / FP32_FILE)
        except OSError:  # another process got there first, or the disk is full: no cache
            pass
    return ov_model, "converted at load"


def export_openvino(
    model: nn.Module,
    img_size: int,
    in_chans: int,
    out_dir: Path,
    *,
    check: list[np.ndarray],
    labels: np.ndarray | None = None,
    calib: list[np.ndarray] | None = None,
    int8_model: Any | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/openvino/model.xml`` (and ``model.int8.xml``: ``int8_model``, already
    quantized by quantization-aware training, else NNCF calibrated on ``calib``), check the fp32 model against PyTorch on the ``check`` batches (max abs logit
    difference) and, with ``labels`` for them, the int8 accuracy change. Returns what was
    measured."""
    folder = Path(out_dir) / FOLDER
    ov_model = convert(model, img_size, in_chans)
    report: dict[str, Any] = {"openvino": str(save(ov_model, folder / FP32_FILE))}
    if not check:
        return report
    x = torch.from_numpy(np.concatenate(check))
    fp32 = OpenVinoEngine(ov_model, "fp32", source="export check")(x)
    with torch.no_grad():
        reference = copy.deepcopy(model).float().eval()(x)
    report["openvino_max_abs_logit_diff"] = float((fp32 - reference).abs().max())
    if calib or int8_model is not None:
        q = int8_model if int8_model is not None else quantize(ov_model, calib or [])
        report["openvino_int8"] = str(save(q, folder / INT8_FILE))
        int8_logits = OpenVinoEngine(q, "int8", source="export check")(x)
        if labels is not None and labels.ndim == 2 and len(labels) == len(x):
            report.update(_multilabel_check(fp32.numpy(), int8_logits.numpy(), labels))
            return report
        int8 = int8_logits.argmax(1).numpy()
        report["openvino_int8_top1_agreement"] = float((int8 == fp32.argmax(1).numpy()).mean())
        if labels is not None and len(labels) == len(x):
            acc32 = float((fp32.argmax(1).numpy() == labels).mean())
            acc8 = float((int8 == labels).mean())
            report.update(openvino_fp32_accuracy=acc32, openvino_int8_accuracy=acc8,
                          openvino_int8_accuracy_change=acc8 - acc32)  # fmt: skip
    return report


def _multilabel_check(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The int8 check of a multi-label model: mAP before and after, and how many per-class
    decisions (at p = 0.5) agree."""
    from ..tasks.multi import mean_average_precision

    map32, map8 = mean_average_precision(fp32, labels), mean_average_precision(int8, labels)
    return {"openvino_fp32_mAP": map32, "openvino_int8_mAP": map8,
            "openvino_int8_mAP_change": map8 - map32,
            "openvino_int8_label_agreement": float(((fp32 > 0) == (int8 > 0)).mean())}  # fmt: skip

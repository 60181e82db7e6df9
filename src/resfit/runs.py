"""The run folder: what ``resfit train`` writes and every other command reads, named once.

    RUN/config.json        resolved configuration (enough to reproduce the run)
    RUN/classes.json       class names, in label order
    RUN/splits.csv         every file with its label and split (train / val / test)
    RUN/model.safetensors  the best weights (by the task's validation score)
    RUN/calibration.json   temperature(s) fitted on validation; multi-label adds
    RUN/thresholds.json    a decision threshold per class ({class: threshold}, editable)
    RUN/unknown.json       the unknown-input score, its threshold and how it was chosen
    RUN/unknown.safetensors  that score's fitted arrays, and the validation probabilities and
                           labels that conformal sets and --max-risk are calibrated on
    RUN/summary.json       best epoch, best validation score, test score
    RUN/metrics.csv        one row per epoch
    RUN/train.log          the log
    RUN/skipped.csv        files that could not be decoded, with the reason
    RUN/report.html        the training report
    RUN/eval-NAME/         an evaluation: metrics.json, per_class.csv, predictions.csv, ...
    RUN/export/            ``resfit export``'s files and export.json
    RUN/checkpoints/last.pt, best.safetensors   ``--resume`` continues from last.pt
    RUN/checkpoints/last.prev.pt   the checkpoint before last.pt: ``--resume`` falls back to
                           it, with a warning, when last.pt cannot be read

Every file is written atomically and durably (:mod:`resfit.core.atomic`). This module sits
above :mod:`resfit.core` and below training, inference, export, insight, quality and apps:
it imports only ``resfit.core`` at module level (torch and safetensors inside functions).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.atomic import (
    atomic_open,
    atomic_save_safetensors,
    atomic_write_json,
    remove_stale_temps,
)
from .core.errors import RunError, TrainingError
from .core.hashing import file_sha256

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("resfit")

CONFIG = "config.json"
CLASSES = "classes.json"
SPLITS = "splits.csv"
MODEL = "model.safetensors"
QAT_MODEL = "model.qat.safetensors"  # --qat: the fake-quantized graph's state (export --int8)
CALIBRATION = "calibration.json"
THRESHOLDS = "thresholds.json"
UNKNOWN = "unknown.json"
UNKNOWN_ARRAYS = "unknown.safetensors"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
LOG = "train.log"
SKIPPED = "skipped.csv"
REPORT = "report.html"
TRACKING = "tracking.json"  # --track: where the run is tracked (tracker, URI, run id)
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
LAST_PREV = "last.prev.pt"
BEST = "best.safetensors"
EXPORT = "export"
EXPORT_REPORT = "export.json"
DEPLOY_REPORT = "deploy.json"  # in RUN/export/: resfit bench deploy's table
# The small-device files of `resfit export --format F [--int8]`, in RUN/export/F/.
EDGE_FILES = {
    ("executorch", "fp32"): "model.pte",
    ("executorch", "int8"): "model.int8.pte",
    ("litert", "fp32"): "model.tflite",
    ("litert", "int8"): "model.int8.tflite",
    ("ncnn", "fp32"): "model.ncnn.param",  # with model.ncnn.bin beside it
    ("coreml", "fp32"): "model.mlpackage",
}
EVAL_METRICS = "metrics.json"  # in RUN/eval-NAME/
LR_FIND_JSON = "lr_find.json"
LR_FIND_CSV = "lr_find.csv"
LR_FIND_PLOT = "lr_find.png"

FINISHED = (CONFIG, CLASSES, MODEL)  # what a finished run has, for predict/export/serve


@dataclass(frozen=True)
class RunPaths:
    """The paths of one run folder: ``RunPaths("RUN").model`` is ``RUN/model.safetensors``."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG)
    classes = property(lambda self: self.root / CLASSES)
    splits = property(lambda self: self.root / SPLITS)
    model = property(lambda self: self.root / MODEL)
    qat_model = property(lambda self: self.root / QAT_MODEL)
    calibration = property(lambda self: self.root / CALIBRATION)
    thresholds = property(lambda self: self.root / THRESHOLDS)
    unknown = property(lambda self: self.root / UNKNOWN)
    unknown_arrays = property(lambda self: self.root / UNKNOWN_ARRAYS)
    summary = property(lambda self: self.root / SUMMARY)
    metrics = property(lambda self: self.root / METRICS)
    log = property(lambda self: self.root / LOG)
    skipped = property(lambda self: self.root / SKIPPED)
    report = property(lambda self: self.root / REPORT)
    tracking = property(lambda self: self.root / TRACKING)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    last = property(lambda self: self.root / CHECKPOINTS / LAST)
    last_prev = property(lambda self: self.root / CHECKPOINTS / LAST_PREV)
    best = property(lambda self: self.root / CHECKPOINTS / BEST)
    export = property(lambda self: self.root / EXPORT)
    lr_find_json = property(lambda self: self.root / LR_FIND_JSON)
    lr_find_csv = property(lambda self: self.root / LR_FIND_CSV)
    lr_find_plot = property(lambda self: self.root / LR_FIND_PLOT)

    deploy = property(lambda self: self.root / EXPORT / DEPLOY_REPORT)

    def edge(self, format: str, precision: str = "fp32") -> Path:
        """The exported file of a small-device format, ``RUN/export/FORMAT/model...``."""
        return self.root / EXPORT / format / EDGE_FILES[(format, precision)]

    def eval(self, name: str) -> Path:
        """The folder of an evaluation, ``RUN/eval-NAME``."""
        return self.root / f"eval-{name}"

    def started(self) -> bool:
        """Whether a run was trained here (a checkpoint or a model): not a fresh ``--out``."""
        return self.last.exists() or self.model.exists()


# ---------------------------------------------------------------------------------------------
# Reading


def check_finished(run: str | os.PathLike) -> RunPaths:
    """The run's paths; a :class:`RunError` naming the first missing file if it is not a
    finished run."""
    paths = RunPaths(run)
    for name in FINISHED:
        if not (paths.root / name).is_file():
            raise RunError(
                f"{paths.root} is not a finished resfit run: {name} is missing "
                f"(train one with `resfit train DATA --out {paths.root}`)"
            )
    return paths


def read_config(run: str | os.PathLike) -> dict:
    """``RUN/config.json`` as a dict."""
    return json.loads(RunPaths(run).config.read_text())


def read_saved_config(run: str | os.PathLike) -> dict | None:
    """``RUN/config.json`` as a dict, or None where the folder has none."""
    path = RunPaths(run).config
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(run: str | os.PathLike) -> tuple[dict, list[str]]:
    """The resolved config and class names of a finished run folder."""
    paths = check_finished(run)
    return read_config(run), json.loads(paths.classes.read_text())


def load_weights(run: str | os.PathLike) -> dict[str, Tensor]:
    """The run's best weights (``RUN/model.safetensors``) as a state dict on the CPU."""
    from safetensors.torch import load_file  # numpy-heavy: only here

    return load_file(str(RunPaths(run).model))


def model_sha256(run: str | os.PathLike) -> str:
    """The sha256 of the run's weights file: names the model that made an output."""
    return file_sha256(RunPaths(run).model)


def read_temperature(run: str | os.PathLike) -> float | None:
    """The calibration temperature of a run (``RUN/calibration.json``), None if uncalibrated."""
    path = RunPaths(run).calibration
    return json.loads(path.read_text())["temperature"] if path.exists() else None


def read_thresholds(run: str | os.PathLike, classes: Sequence[str]) -> list[float] | None:
    """A multi-label run's decision thresholds, in class order, from ``RUN/thresholds.json``
    (``{class: threshold}``, written by training; a class it lacks gets 0.5). None if absent."""
    path = RunPaths(run).thresholds
    if not path.is_file():
        return None
    try:
        by_class = json.loads(path.read_text())
        return [float(by_class.get(c, 0.5)) for c in classes]
    except (ValueError, AttributeError, TypeError) as e:
        raise RunError(f"{path}: expected {{class: threshold}}, {e}") from None


def read_unknown(run: str | os.PathLike) -> tuple[dict, dict[str, Any]] | None:
    """``RUN/unknown.json`` and the numpy arrays of ``RUN/unknown.safetensors``; None for a
    run trained before resfit fitted an unknown score (or one that has none)."""
    paths = RunPaths(run)
    if not (paths.unknown.is_file() and paths.unknown_arrays.is_file()):
        return None
    from safetensors.numpy import load_file

    try:
        return json.loads(paths.unknown.read_text()), load_file(str(paths.unknown_arrays))
    except (ValueError, OSError) as e:
        raise RunError(f"{paths.unknown_arrays}: cannot be read ({e}); train again") from None


def load_checkpoint(run: str | os.PathLike) -> tuple[dict, Path] | None:
    """The resume checkpoint and where it came from: ``last.pt``, or where that cannot be read
    (cut short by a power cut or a full disk) ``last.prev.pt``, with a warning. None where the
    run has neither; a :class:`TrainingError` where neither can be read."""
    import torch

    paths, errors = RunPaths(run), []
    for path in (paths.last, paths.last_prev):
        if not path.exists():
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a cut file: RuntimeError, EOFError, UnpicklingError ...
            errors.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0]}")
            log.warning("cannot read the checkpoint %s (%s)", path, errors[-1])
            continue
        if errors:
            log.warning("resuming from the previous checkpoint %s instead", path)
        return ck, path
    if errors:
        raise TrainingError(
            f"no readable checkpoint in {paths.checkpoints} ({'; '.join(errors)}): "
            "train again without --resume (in a new --out)"
        )
    return None


def clean_leftovers(run: str | os.PathLike) -> None:
    """Remove the temporary files that a killed run left in its folder and the folders in it
    (``.NAME.tmp-<pid>-<start>`` of writers that are gone): called when a run starts or resumes."""
    root = Path(run)
    if not root.is_dir():
        return
    # Not through symlinks: a tune trial's cache/ is the study's, shared with live trials.
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    for folder in [root, *subfolders]:
        for path in remove_stale_temps(folder):
            log.info("removed %s, left by a run that was killed while writing", path)


# ---------------------------------------------------------------------------------------------
# Writing (atomically)


def write_config(run: str | os.PathLike, config: Mapping[str, Any], classes: Sequence[str]) -> None:
    """``RUN/config.json`` and ``RUN/classes.json``."""
    paths = RunPaths(run)
    atomic_write_json(paths.config, dict(config))
    atomic_write_json(paths.classes, list(classes))


def write_model(
    run: str | os.PathLike, state: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``RUN/model.safetensors``."""
    atomic_save_safetensors(state, RunPaths(run).model, metadata)


def write_qat_model(
    run: str | os.PathLike, state: dict[str, Tensor], epoch: int | None = None
) -> None:
    """``RUN/model.qat.safetensors``: the quantization-aware graph's weights and ranges, of
    ``epoch`` (1-based, kept in the file's metadata as ``model.safetensors`` keeps its own).
    Its shared observers (one range for several tensors) are stored once per name: loading
    writes the same values into the shared tensor."""
    meta = None if epoch is None else {"epoch": str(epoch)}
    atomic_save_safetensors({k: v.detach().clone() for k, v in state.items()},
                            RunPaths(run).qat_model, meta)  # fmt: skip


def _epoch_of(path: Path) -> str | None:
    """The ``epoch`` a safetensors file's metadata names (None: not recorded, or no file)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("epoch")


def load_qat_model(run: str | os.PathLike) -> dict[str, Tensor] | None:
    """The state of ``RUN/model.qat.safetensors``, or None where the run has none. A
    :class:`RunError` where it is of another epoch than ``model.safetensors``: its int8 model
    would not be the run's model."""
    from safetensors.torch import load_file

    paths = RunPaths(run)
    if not paths.qat_model.is_file():
        return None
    qat, model = _epoch_of(paths.qat_model), _epoch_of(paths.model)
    if qat is not None and model is not None and qat != model:
        raise RunError(
            f"{paths.qat_model} is the quantization-aware state of epoch {qat}, "
            f"{paths.model.name} is epoch {model}'s: its int8 would not be this model. "
            f"Delete {paths.qat_model.name} and export --int8 with --calib DATA (calibrated), "
            f"or train again with more --qat epochs"
        )
    return load_file(str(paths.qat_model))


def write_calibration(run: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """``RUN/calibration.json``."""
    atomic_write_json(RunPaths(run).calibration, dict(record))


def write_thresholds(run: str | os.PathLike, thresholds: Mapping[str, float]) -> None:
    """``RUN/thresholds.json``: ``{class: threshold}``."""
    atomic_write_json(RunPaths(run).thresholds, dict(thresholds))


def write_tracking(run: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """``RUN/tracking.json``: where ``--track`` logs this run (``resfit export`` adds to it)."""
    atomic_write_json(RunPaths(run).tracking, dict(record))


def read_tracking(run: str | os.PathLike) -> dict | None:
    """``RUN/tracking.json`` as a dict, or None for a run that was not tracked."""
    path = RunPaths(run).tracking
    return json.loads(path.read_text()) if path.is_file() else None


def artifact_paths(run: str | os.PathLike) -> list[Path]:
    """What a tracker keeps of a run: its files (model, config, metrics, report, log ...) and
    its ``export/`` folder; not the checkpoints, caches or TensorBoard logs (big, or only
    useful on this machine)."""
    root = Path(run)
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return files + [root / EXPORT] if (root / EXPORT).is_dir() else files


def write_unknown(
    run: str | os.PathLike, record: Mapping[str, Any], arrays: Mapping[str, Any]
) -> None:
    """``RUN/unknown.safetensors`` (numpy arrays), then ``RUN/unknown.json`` (the record)."""
    from safetensors.numpy import save

    paths = RunPaths(run)
    with atomic_open(paths.unknown_arrays, "wb") as f:
        f.write(save(dict(arrays)))
    atomic_write_json(paths.unknown, dict(record))


def write_summary(run: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """``RUN/summary.json``."""
    atomic_write_json(RunPaths(run).summary, dict(summary))


class FileLog:
    """Send the resfit log to ``RUN/train.log`` (appended) while in the ``with`` block."""

    def __init__(self, run: str | os.PathLike, enabled: bool) -> None:
        self.handler = (
            logging.FileHandler(RunPaths(run).log, encoding="utf-8", errors="backslashreplace")
            if enabled
            else None
        )
        if self.handler:
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> FileLog:
        if self.handler:
            log.addHandler(self.handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handler:
            log.removeHandler(self.handler)
            self.handler.close()

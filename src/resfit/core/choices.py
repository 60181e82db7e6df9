"""The choice lists of the options (``--optimizer``, ``--freeze``, ``--format`` ...): each named
once here, read by :mod:`resfit.core.config` (which re-exports them) and by the parts that
implement a choice. No torch."""

from __future__ import annotations

from collections.abc import Sequence

from .labels import CODINGS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
FREEZE_CHOICES = ("none", "stem", "layer1", "layer2", "layer3", "layer4", "backbone")
RECIPES = ("auto", "finetune", "plain")
UNFREEZE = ("all", "gradual")
CACHE_CHOICES = ("auto", "memory", "disk", "off")
CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BALANCE = ("weights", "sampler")


class _TaskNames(Sequence[str]):
    """``--task``'s choices: ``auto`` and every registered task, read when asked, so a task
    registered with ``tasks.registry.register_task`` is a valid ``--task`` at once."""

    def _names(self) -> tuple[str, ...]:
        return ("auto", *CODINGS.names())

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


TASKS: Sequence[str] = _TaskNames()  # what the labels mean
MULTILABEL_LOSSES = ("bce", "asl")
LEAKAGE = ("report", "remove", "off")
LEAKAGE_SIGNALS = ("phash", "both")  # both: pHash and embeddings (resfit.leakage)
EXPORT_FORMATS = (  # resfit export --format
    "onnx", "triton", "openvino", "tensorrt", "executorch", "litert", "ncnn", "coreml",
)  # fmt: skip
TRACKERS = ("mlflow",)  # --track: experiment trackers (training/tracking.py)
DATA_MODES = ("auto", "memory", "stream", "shards")  # sources.SOURCES (and auto): where images live
UNKNOWN_SCORES = (
    "multistage",
    "vim",
    "knn",
    "msp",
    "energy",
    "maxlogit",
    "mahalanobis",
    "none",
)  # inference.unknown.SCORES

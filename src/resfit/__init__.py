"""resfit: residual networks from a folder of labelled images to a model you can ship.

import resfit
result = resfit.train(data="DATA", out="runs/a", arch="resnet20_cifar", epochs=30)
print(resfit.evaluate("runs/a", "DATA/test").accuracy)
preds, skipped = resfit.Predictor.from_run("runs/a").predict(["new.jpg"], top_k=3)
model = resfit.create_model("resnet50", weights="pretrained", num_classes=5)

The names below are imported on first use, so ``import resfit`` (and ``resfit --help``) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Predictor": "inference.predictor",
    "TrainConfig": "core.config",
    "evaluate": "insight.evaluation",
    "train": "training",
    "distill": "training",
    "tune": "apps.tune",
    "create_model": "models.weights",
    "get_weights": "models.weights",
    "list_weights": "models.weights",
    "list_models": "models.resnet",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

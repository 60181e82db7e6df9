"""resfit: residual networks from a folder of labelled images to a model you can ship.

import resfit
result = resfit.train(data="DATA", out="runs/a", arch="resnet20_cifar", epochs=30)
print(resfit.evaluate("runs/a", "DATA/test").accuracy)
preds, skipped = resfit.Predictor.from_run("runs/a").predict(["new.jpg"], top_k=3)
model = resfit.create_model("resnet50", weights="pretrained", num_classes=5)
"""

from .evaluation import evaluate
from .inference import Predictor
from .models import list_models
from .training import TrainConfig, train
from .weights import create_model, get_weights, list_weights

__version__ = "0.1.0"

__all__ = [
    "Predictor",
    "TrainConfig",
    "__version__",
    "create_model",
    "evaluate",
    "get_weights",
    "list_models",
    "list_weights",
    "train",
]

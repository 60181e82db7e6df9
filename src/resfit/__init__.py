"""resfit: residual networks from a folder of labelled images to a model you can ship."""

from .models import list_models
from .weights import create_model, get_weights, list_weights

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_weights", "list_models", "list_weights"]

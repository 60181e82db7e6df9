"""resfit's one cache root: ``RESFIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/resfit``, else
``~/.cache/resfit``. Downloaded weights, OpenVINO conversions and TensorRT engines live under it.

Its own module, importing nothing, so that the engines find the cache without importing
:mod:`resfit.models.weights`, which reads torchvision's weights tables (and so imports torchvision,
0.9-1.3 s) when it loads.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    root = os.environ.get("RESFIT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "resfit"

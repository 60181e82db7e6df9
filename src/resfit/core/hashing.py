"""Digests of files and of a model's weights, written once for every cache key and identity
that follows the weights (feature cache, TensorRT and OpenVINO caches, embeddings, runs)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def update_with_weights(h: Any, state: Mapping[str, Tensor]) -> None:
    """Feed a state dict to the hash object ``h`` (hashlib): each entry's name, then its
    tensor's raw bytes, in order. Bit-identical weights give the same digest on any device."""
    for name, t in state.items():
        h.update(name.encode())
        h.update(_raw_bytes(t))


def _raw_bytes(t: Tensor) -> bytes:
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(
    modules: nn.Module | Iterable[nn.Module], *extra: str, digest_size: int = 16
) -> str:
    """blake2b over ``extra`` (joined by ``|``) and the state dicts of ``modules``: a key for a
    cache of what was derived from those weights (an ONNX export, an OpenVINO conversion)."""
    from torch import nn

    h = hashlib.blake2b(digest_size=digest_size)
    if extra:
        h.update("|".join(extra).encode())
    for m in [modules] if isinstance(modules, nn.Module) else modules:
        update_with_weights(h, m.state_dict())
    return h.hexdigest()

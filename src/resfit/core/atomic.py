"""Atomic writes: a temporary file, then a rename. A crash or a full disk never leaves a
half-written checkpoint, model or config in place of the previous one."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` atomically."""
    tmp = _tmp(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(
    state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """A state dict as safetensors (loadable without unpickling), atomically."""
    from safetensors.torch import save_file

    tmp = _tmp(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Text as UTF-8; characters that cannot be encoded (the undecodable bytes of an odd file
    name) are written back as the bytes they came from."""
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""DICOM files and intensity windows: a single-frame DICOM image read with pydicom (the
``dicom`` extra), its rescale slope and intercept applied, and the values mapped to grey through a
window (level and width) the way a radiologist's viewer shows them, MONOCHROME1 inverted.

The window is the file's own (Window Center / Window Width) unless one is chosen: ``"L,W"`` or a
named preset (:data:`WINDOW_PRESETS`, in Hounsfield units). The same choice applies to 16-bit PNG
and TIFF files (:func:`window_array`). The window is applied to the raw values in float32 and
its result stays float32 in [0, 1] on its way to the model (resize, crop and normalisation in
float): no contrast inside the window is lost to an 8-bit step.

The chosen window is a value (``(level, width)`` or None), passed explicitly to every decoding
function (:func:`resfit.data.decode.load_image` and the sources and datasets built on it); a run
records it in its config.json and the Predictor reads it there. No process-wide state: two runs
with different windows in one process (a notebook, a server) do not interfere. Patient data never
leaves this module: errors name the file, not the patient.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..core.windows import WINDOW_PRESETS, Window, parse_window

__all__ = [
    "DICOM_SUFFIXES",
    "WINDOW_PRESETS",
    "dicom_pixels",
    "dicom_tags",
    "is_dicom",
    "parse_window",
    "read_dicom",
    "to_uint8",
    "window_array",
]

DICOM_SUFFIXES = (".dcm", ".dicom")
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The packages pydicom's pixel handlers need for the compressed transfer syntaxes.
_DECODERS = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
PIP_DICOM = "pip install 'resfit[dicom]'"


def window_array(values: np.ndarray, window: Window) -> np.ndarray:
    """Values (any numeric type) to float32 grey in [0, 1] through ``(level, width)``: below the
    window is black, above it white, linear between (DICOM PS3.3 C.11.2.1.2, simplified); with
    no window, the values' own minimum to maximum. Full precision: no 8-bit step."""
    v = values.astype(np.float32, copy=False)
    if window is None:
        lo, hi = float(v.min()), float(v.max())
    else:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    span = (hi - lo) or 1.0
    return np.clip((v - lo) * np.float32(1.0 / span), 0.0, 1.0).astype(np.float32, copy=False)


def to_uint8(grey: np.ndarray) -> np.ndarray:
    """Float grey in [0, 1] as uint8 (rounded): for a display, a JPEG shard, never the model."""
    return np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8)


def is_dicom(path: Path, data: bytes | None = None) -> bool:
    """A DICOM file by its suffix or its ``DICM`` preamble (many scanners write no suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if data is not None:
        return data[128:132] == b"DICM"
    if suffix in _PHOTO_SUFFIXES:  # a photo by its name: no extra read per image
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"reading DICOM files needs pydicom: {PIP_DICOM}") from None
    return pydicom


def _open(path: Path, data: bytes | None, pixels: bool):
    pydicom = _pydicom()
    src = io.BytesIO(data) if data is not None else str(path)
    return pydicom.dcmread(src, force=True, stop_before_pixels=not pixels)


def dicom_tags(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The named header tags of a DICOM file as text ("" where absent), pixels not read."""
    ds = _open(path, None, pixels=False)
    return {n: str(getattr(ds, n, "") or "").strip() for n in names}


def dicom_pixels(data: bytes) -> int:
    """Rows x Columns from a DICOM body's header, no pixel data decoded (the service's limit)."""
    ds = _open(Path("upload.dcm"), data, pixels=False)
    return int(getattr(ds, "Rows", 0) or 0) * int(getattr(ds, "Columns", 0) or 0)


def _first(value) -> float | None:
    """A window tag's value (it may be multi-valued: the first is the default view)."""
    if value is None or value == "":
        return None
    try:
        return float(
            value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
        )
    except (TypeError, ValueError):
        return None


def read_dicom(
    path: Path, data: bytes | None = None, max_pixels: int | None = None, *, window: Window = None
) -> np.ndarray:
    """A single-frame DICOM image: grey as float32 (H, W) in [0, 1], rescaled, windowed
    (``window``, else the file's own, else its range) and MONOCHROME1 inverted; colour as uint8
    (H, W, 3). Raises ``ValueError`` with a one-line reason (no pixel data, several frames, a
    decoder missing)."""
    ds = _open(path, data, pixels=True)
    if "PixelData" not in ds:
        raise ValueError("DICOM file without pixel data (no PixelData element)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): only single-frame files are read")
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if max_pixels and rows * cols > max_pixels:  # from the header, before decoding
        raise ValueError(f"{cols}x{rows} pixels exceeds the {max_pixels:,} limit")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom: NotImplementedError/RuntimeError for a missing handler
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise ValueError(
                f"compressed DICOM ({syntax.name}) needs a decoder: pip install {_DECODERS}"
            ) from None
        raise ValueError(f"DICOM pixel data does not decode: {str(e).splitlines()[0]}") from None
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _colour(pixels)
    slope = _first(getattr(ds, "RescaleSlope", None)) or 1.0
    intercept = _first(getattr(ds, "RescaleIntercept", None)) or 0.0
    values = pixels.astype(np.float32) * slope + intercept
    if window is None:
        level, width = (_first(getattr(ds, t, None)) for t in ("WindowCenter", "WindowWidth"))
        window = (level, width) if level is not None and width else None
    grey = window_array(values, window)
    return np.subtract(1.0, grey, out=grey) if photometric == "MONOCHROME1" else grey


def _colour(pixels: np.ndarray) -> np.ndarray:
    """An RGB DICOM (secondary captures, photos) as uint8 (H, W, 3)."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"DICOM pixel data of shape {pixels.shape} is not one image")
    if pixels.dtype != np.uint8:
        return to_uint8(window_array(pixels, None))
    return pixels

"""Intensity windows (level, width) for DICOM and 16-bit images: the ``--window`` value and the
named CT presets. Text only (no numpy): :mod:`resfit.core.config` checks the option with it and
:mod:`resfit.data.dicom` applies it."""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["WINDOW_PRESETS", "Window", "parse_window", "window_value"]

# A chosen window (level, width), or None: the DICOM file's own, else the whole range.
Window = tuple[float, float] | None

# Common CT windows (level, width) in Hounsfield units, as radiology viewers name them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "soft-tissue": (50.0, 400.0),
    "brain": (40.0, 80.0),
}


def parse_window(spec: str | None) -> Window:
    """``"40,400"`` or a preset name as (level, width); None or ``""``: the file's own."""
    if not spec:
        return None
    spec = spec.strip().lower()
    if spec in WINDOW_PRESETS:
        return WINDOW_PRESETS[spec]
    try:
        level, width = (float(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(
            f"--window must be LEVEL,WIDTH (e.g. 40,400) or one of "
            f"{', '.join(WINDOW_PRESETS)}, not {spec!r}"
        ) from None
    if not width > 0:
        raise ConfigError(f"--window's width must be above 0, got {width:g}")
    return level, width


def window_value(text: str) -> str:
    """``--window``'s value, checked (:func:`parse_window`), kept as the text the user gave."""
    try:
        parse_window(text)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return text.strip().lower()


window_value.__name__ = "LEVEL,WIDTH or a preset"  # argparse names the type in its error message

"""The augmentation presets and the policy behind ``--augment auto``.

What each preset sets (:data:`PRESET_VALUES`), and which preset ``auto`` stands for at an image
size (:func:`auto_preset`). Imports nothing (the config's schema builds on it).
"""

from __future__ import annotations

PRESETS = ("none", "light", "standard", "strong")
# --augment's choices: a preset, or auto (chosen by the image size when the config is resolved).
AUGMENT_CHOICES = ("auto", *PRESETS)
# At this size and below, auto picks the light preset (flips and crops) with milder crops:
# measured on flowers5 at 32 px (bench/defaults.py), rotation, shifts and colour jitter cost
# 1.4 points there, and crops of 50-100 % beat 35-100 % by 2 to 5 points on three of the
# suite's small-image tasks (the same on all of flowers5).
SMALL_IMAGE = 64
SMALL_IMAGE_CROP = (0.5, 1.0)
# ... except in a short run from scratch: seen this few times, an image is not memorised, and
# random flips and crops only slow the fit. Measured at 16-32 px (bench/defaults.py tasks, mean
# of 2-3 seeds, no augmentation against light crops): cifar10 500/class 6 epochs 57.3 % vs
# 53.2 %, 50/class 10 epochs 40.0 % vs 37.2 %, digits 10 epochs 97.8 % vs 95.0 %; from 12
# epochs the crops win (500/class 61.5 % vs 57.4 %, 50/class 20 epochs 42.2 % vs 36.8 %).
SHORT_SCRATCH_EPOCHS = 10


def auto_preset(img_size: int | None, short_scratch: bool = False) -> str:
    """The preset ``--augment auto`` stands for at ``img_size`` (unknown: standard);
    ``short_scratch``: a run from scratch of at most :data:`SHORT_SCRATCH_EPOCHS` epochs."""
    if img_size is None or img_size > SMALL_IMAGE:
        return "standard"
    return "none" if short_scratch else "light"


# What each preset sets; ``None`` in an :class:`~resfit.core.config.AugmentConfig` knob means
# "the preset's value".
_OFF = dict(
    hflip=0.0,
    vflip=0.0,
    crop_scale=(1.0, 1.0),
    rotation=0.0,
    translate=0.0,
    zoom=(1.0, 1.0),
    color_jitter=0.0,
    policy="none",
    erasing=0.0,
    mixup=0.0,
    cutmix=0.0,
)
PRESET_VALUES: dict[str, dict] = {
    "none": _OFF,
    "light": {**_OFF, "hflip": 0.5, "crop_scale": (0.35, 1.0)},
    "standard": {
        **_OFF,
        "hflip": 0.5,
        "crop_scale": (0.35, 1.0),
        "rotation": 15.0,
        "translate": 0.1,
        "zoom": (0.9, 1.1),
        "color_jitter": 0.2,
    },
    "strong": {
        **_OFF,
        "hflip": 0.5,
        "crop_scale": (0.25, 1.0),
        "policy": "trivialaugment",
        "erasing": 0.25,
        "mixup": 0.2,
        "cutmix": 1.0,
    },
}

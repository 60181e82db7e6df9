"""What ``--resume`` may change: the options a resumed run applies, and the ones it refuses
(those that would change what the run computes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import OPTIONS, AugmentConfig, TrainConfig, flag
from .errors import ConfigError


def resume_changes(saved: TrainConfig, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``given`` that a resumed run applies; raises ConfigError for an option
    that would change what the run computes (``--lr`` mid-run), naming the option."""
    apply, refused = {}, []
    for name, value in given.items():
        info = OPTIONS.get(name)
        if info is None:
            raise ConfigError(f"unknown option {name!r}")
        current = saved.get(name)
        if name == "augment" and isinstance(value, AugmentConfig):
            current, value = saved.augment.resolved(), value.resolved()
        if value == current:
            continue
        if info.resumable:
            apply[name] = value
        else:
            refused.append(f"{flag(name)} (the run has {current!r}, given {value!r})")
    if refused:
        raise ConfigError(
            "--resume continues a run as it was configured, and these options cannot change "
            f"mid-run: {'; '.join(refused)}. Leave them out, or start a new run with another --out."
        )
    return apply

"""Tasks: what the network's outputs mean, how they are scored and turned into answers.

A task owns the loss, the metrics the loop logs and monitors, the post-processing of logits
into probabilities, and the calibration fitted on validation. The training loop, evaluation and
inference ask the task, so a new kind of label (several per image) is a new task, not edits
across the code.

Today: :class:`SingleLabel` (one class per image: softmax, cross-entropy, argmax accuracy)
and :class:`MultiLabel` (any number of classes per image: a sigmoid per class, binary
cross-entropy or the asymmetric loss, mean average precision). :func:`task_for` gives the task
a run's ``config.json`` names.

Add a task: subclass :class:`Task`, implement its methods and register the class in
:data:`TASKS` under the name ``--task`` and a run's ``config.json`` use for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.registry import Registry
from .base import Task
from .multi import MultiLabel
from .single import SingleLabel

TASKS: Registry[str, type[Task]] = Registry("task")
TASKS.register("single", SingleLabel)
TASKS.register("multilabel", MultiLabel)


def task_for(cfg: Mapping[str, Any]) -> Task:
    """The task of a run from its ``config.json`` (runs before multi-label: single-label)."""
    return TASKS.get(cfg.get("task") or "single")()

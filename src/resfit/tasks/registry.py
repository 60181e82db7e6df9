"""Tasks: what the network's outputs mean, how they are scored and turned into answers.

A task owns the loss, the metrics the loop logs and monitors, the post-processing of logits
into probabilities, and the calibration fitted on validation. The training loop, evaluation and
inference ask the task, so a new kind of label (several per image) is a new task, not edits
across the code.

Today: :class:`SingleLabel` (one class per image: softmax, cross-entropy, argmax accuracy)
and :class:`MultiLabel` (any number of classes per image: a sigmoid per class, binary
cross-entropy or the asymmetric loss, mean average precision). :func:`task_for` gives the task
a run's ``config.json`` names.

Add a task: subclass :class:`Task`, implement its methods and register the class with
:func:`register_task` under the name ``--task`` and a run's ``config.json`` use for it (this
also tells the data layer, which may not import the tasks, how the task's labels are held).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.labels import CODINGS
from ..core.registry import Registry
from .base import Task
from .multi import MultiLabel
from .single import SingleLabel

TASKS: Registry[str, type[Task]] = Registry("task")
TASKS.register("single", SingleLabel)
TASKS.register("multilabel", MultiLabel)  # core.labels.CODINGS has both codings already


def register_task(name: str, cls: type[Task]) -> type[Task]:
    """Add a task under ``name``, with its label coding for the data layer."""
    CODINGS.register(name, cls.coding)
    return TASKS.register(name, cls)


def unregister_task(name: str) -> type[Task]:
    """Take a task out again (a test's temporary one)."""
    CODINGS.remove(name)
    return TASKS.remove(name)


def task_for(cfg: Mapping[str, Any]) -> Task:
    """The task of a run from its ``config.json`` (runs before multi-label: single-label)."""
    return TASKS.get(cfg.get("task") or "single")()

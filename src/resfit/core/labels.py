"""How a task's labels are stored: a class index per image, or a multi-hot tuple.

A task (:mod:`resfit.tasks`) names its coding; the data layer, which may not import the tasks,
looks the coding up here by the task's name (:data:`CODINGS`, filled by
``resfit.tasks.registry.register_task``). So reading, writing, counting and converting labels
ask the coding instead of testing for multi-label. Torch is imported only where a tensor is made
(``resfit --help`` imports this module through the config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import DataError
from .registry import Registry

__all__ = ["CODINGS", "CLASS_INDEX", "MULTI_HOT", "ClassIndex", "LabelCoding", "MultiHot",
           "coding_for", "coding_of"]  # fmt: skip

Label = Any  # int (class index) or tuple[int, ...] (multi-hot)


class LabelCoding:
    """One way to hold a sample's label; subclasses say how."""

    column: str  # the label column of a CSV manifest or splits file
    float_targets: bool  # float targets (a loss on probabilities) or class indices

    def classes_of(self, label: Label) -> list[int]:
        """The indices of the classes the label names."""
        raise NotImplementedError

    def from_classes(self, indices: Iterable[int], k: int) -> Label:
        """The label naming these class indices (of ``k`` classes)."""
        raise NotImplementedError

    def text(self, label: Label, classes: Sequence[str]) -> str:
        """The label as a manifest writes it (several classes joined by ``;``)."""
        return ";".join(classes[i] for i in self.classes_of(label))

    def convert(self, label: Label, k: int, where: Callable[[], str]) -> Label:
        """A label of another coding in this one (``where`` names the image for errors)."""
        return self.from_classes(coding_of(label).classes_of(label), k)

    def targets(self, labels: Sequence[Label], k: int) -> Any:
        """The training targets of ``labels`` as a tensor (``k`` classes)."""
        import torch

        dtype = torch.float32 if self.float_targets else torch.long
        if not labels:
            return torch.zeros((0, k) if self.float_targets else 0, dtype=dtype)
        return torch.tensor(list(labels), dtype=dtype)


class ClassIndex(LabelCoding):
    """One class per image: its index."""

    column = "label"
    float_targets = False

    def classes_of(self, label: Label) -> list[int]:
        return [int(label)]

    def from_classes(self, indices: Iterable[int], k: int) -> Label:
        indices = list(indices)
        if len(indices) != 1:
            raise DataError(f"{len(indices)} labels where one is needed")
        return indices[0]

    def convert(self, label: Label, k: int, where: Callable[[], str]) -> Label:
        indices = coding_of(label).classes_of(label)
        if len(indices) != 1:
            raise DataError(
                f"{where()} has {len(indices)} labels, and --task single needs one per image: "
                f"use --task multilabel (or auto)"
            )
        return indices[0]


class MultiHot(LabelCoding):
    """Any number of classes per image: a 0/1 per class, in the order of the classes."""

    column = "labels"
    float_targets = True

    def classes_of(self, label: Label) -> list[int]:
        return [i for i, on in enumerate(label) if on]

    def from_classes(self, indices: Iterable[int], k: int) -> Label:
        chosen = set(indices)
        return tuple(int(i in chosen) for i in range(k))


CLASS_INDEX, MULTI_HOT = ClassIndex(), MultiHot()

# The coding of each task, by the task's name (--task, a run's config.json, DataSplits.task).
CODINGS: Registry[str, LabelCoding] = Registry("task")
CODINGS.register("single", CLASS_INDEX)
CODINGS.register("multilabel", MULTI_HOT)


def coding_for(task: str | LabelCoding) -> LabelCoding:
    """A task's coding, by the task's name (or the coding itself)."""
    return task if isinstance(task, LabelCoding) else CODINGS.get(task)


def coding_of(label: Label) -> LabelCoding:
    """The coding a stored label is in (a tuple is multi-hot), for data that does not say."""
    return MULTI_HOT if isinstance(label, tuple) else CLASS_INDEX

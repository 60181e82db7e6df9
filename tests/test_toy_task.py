"""A third task, defined here alone, trains, evaluates and predicts through the public API: the
task owns its loss, its metric and its answer, and nothing outside ``resfit.tasks`` needs an edit
to learn it (issue 25: the task owns everything that differs between tasks)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import resfit
from resfit.core import config
from resfit.core.labels import CODINGS
from resfit.tasks.base import Answer
from resfit.tasks.registry import TASKS, register_task, task_for, unregister_task
from resfit.tasks.single import SingleLabel

from .images import make_colour_folder

FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=16, epochs=1, lr=0.05,
            progress=False, report=False, leakage="off", precision="fp32")  # fmt: skip


@dataclass
class Toy(SingleLabel):
    """One class per image, scored its own way: a squared-error loss on the softmax against
    the one-hot target, ``val_toy`` (the share of images whose true class gets over a third of
    the probability) as the monitor, and answers that say which task gave them."""

    name: ClassVar[str] = "toy"
    monitor: ClassVar[str] = "val_toy"
    losses: ClassVar[int] = 0  # how often the loop used this loss

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        Toy.losses += 1
        k = logits.shape[1]
        hot = F.one_hot(target, k).float() if target.ndim == 1 else target.float()
        return ((logits.float().softmax(1) - hot) ** 2).sum(1).mean()

    def val_metrics(self, logits: Tensor, target: Tensor) -> dict[str, float]:
        return {"val_loss": self.loss(logits, target).item(), "val_toy": self._toy(logits, target)}

    def eval_scores(self, logits: Tensor, targets: Tensor) -> dict[str, float]:
        return {"toy": self._toy(logits, targets)}

    @staticmethod
    def _toy(logits: Tensor, target: Tensor) -> float:
        p = logits.float().softmax(1).gather(1, target.long()[:, None])[:, 0]
        return float((p > 1 / 3).float().mean()) if len(p) else 0.0

    def answers(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> list[Answer]:
        return [(f"toy:{label}", *rest) for label, *rest in super().answers(probs, classes, k, thresholds)]  # fmt: skip

    def answer(
        self, probs: Tensor, classes: Sequence[str], k: int, thresholds: Sequence[float]
    ) -> dict[str, Any]:
        return {"task": "toy", **super().answer(probs, classes, k, thresholds)}


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Toy]]:
    """``toy`` registered for this test only; ``--task`` accepts it from then on."""
    assert "toy" not in config.OPTIONS["task"].choices
    register_task("toy", Toy)
    assert "toy" in config.OPTIONS["task"].choices
    Toy.losses = 0
    yield Toy
    unregister_task("toy")


def test_a_task_registered_in_a_test_trains_evaluates_and_predicts(
    toy: type[Toy], tmp_path: Path
) -> None:
    data = make_colour_folder(tmp_path / "colours", per_class=8, splits=("train", "val", "test"))
    out = tmp_path / "run"
    result = resfit.train(data=str(data), out=str(out), task="toy", **FAST)

    assert toy.losses > 0  # the loop trained on the toy loss
    assert json.loads((out / "config.json").read_text())["task"] == "toy"
    assert "val_toy" in result.history[-1]  # the toy metric was logged and picked the epoch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["monitor"] == "val_toy" and "toy" in summary["test"]  # test split's score

    res = resfit.evaluate(out, data / "test", report=False)
    assert 0.0 <= res.summary()["toy"] <= 1.0  # the toy's own score, next to the usual ones
    metrics = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert metrics["toy"] == res.summary()["toy"]

    predictor = resfit.Predictor.from_run(out)
    assert isinstance(predictor.task, Toy)
    preds, skipped = predictor.predict([data / "test" / "red"], top_k=2)
    assert preds and not skipped
    assert all(p.label.startswith("toy:") and len(p.top_k) == 2 for p in preds)
    probs = predictor.probabilities(torch.zeros(1, 3))[0]
    assert predictor.answer(probs)["task"] == "toy"  # what `resfit serve` would send


def test_the_toy_task_is_gone_after_its_test() -> None:
    assert "toy" not in TASKS and "toy" not in CODINGS
    assert "toy" not in config.OPTIONS["task"].choices
    assert type(task_for({"task": "single"})) is SingleLabel

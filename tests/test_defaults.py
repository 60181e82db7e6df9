"""The defaults that depend on the recipe, the batch and the image size (issue 16): what
:meth:`TrainConfig.resolve` fills in, what it logs, and that the README's table says the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resfit.config import SGD_LR_PER_256, AugmentConfig, TrainConfig, defaults_note

README = Path(__file__).resolve().parents[1] / "README.md"
PRE = {"mean": [0.5] * 3, "std": [0.2] * 3}


def _resolved(img_size: int | None = None, **options) -> TrainConfig:
    pre = {**PRE, "input_size": img_size} if img_size else PRE
    return TrainConfig.from_options(data="d", **options).resolve(["a", "b"], pre, 224)


@pytest.mark.parametrize(
    "options, lr",
    [
        ({}, 0.05),  # from scratch, batch 64
        ({"weights": "w.pth"}, 0.01),  # from weights, every layer at one rate
        ({"weights": "w.pth", "recipe": "finetune"}, 0.2),  # the head's rate
        ({"weights": "w.pth", "recipe": "finetune", "batch_size": 32}, 0.1),  # linear in batch
        ({"weights": "w.pth", "recipe": "finetune", "lr": 0.03}, 0.03),  # given: kept
        ({"optimizer": "adamw"}, 1e-3),
        ({"optimizer": "adam", "weights": "w.pth", "recipe": "finetune"}, 3e-4),
    ],
)
def test_the_default_lr_depends_on_recipe_and_batch(options: dict, lr: float) -> None:
    assert _resolved(**options).optim.lr == pytest.approx(lr)


@pytest.mark.parametrize("size, preset", [(16, "light"), (32, "light"), (64, "light"),
                                          (96, "standard"), (224, "standard")])  # fmt: skip
def test_augment_auto_resolves_by_image_size(size: int, preset: str) -> None:
    cfg = _resolved(img_size=size)
    assert cfg.augment.preset == preset  # concrete after resolving: config.json says which
    assert cfg.to_dict()["augment"]["preset"] == preset
    assert cfg.to_dict()["augment"]["rotation"] == (0.0 if preset == "light" else 15.0)


def test_a_given_preset_or_knob_wins_over_auto() -> None:
    assert _resolved(img_size=32, augment="standard").augment.preset == "standard"
    aug = AugmentConfig(crop_scale=(0.7, 1.0))  # preset auto, one knob given
    cfg = _resolved(img_size=32, augment=aug)
    assert cfg.augment.preset == "light" and cfg.augment.resolved().crop_scale == (0.7, 1.0)
    assert TrainConfig().augment.resolved().preset == "standard"  # size unknown: standard


def test_finetune_defaults_and_the_log_line() -> None:
    given = TrainConfig.from_options(data="d", weights="w.pth", recipe="finetune")
    assert given.transfer.head_epochs == 1 and given.transfer.stem_lr_ratio == 0.5
    resolved = given.resolve(["a", "b"], {**PRE, "input_size": 32}, 224)
    note = defaults_note(given, resolved)
    assert "lr 0.2 (sgd, batch 64, from weights, recipe finetune)" in note
    assert "augment light (32 px)" in note and "weight decay 0.0005" in note
    explicit = given.replace(lr=0.1, weight_decay=0.0, augment="light")
    assert defaults_note(explicit, explicit.resolve(["a"], PRE, 224)) == ""


def test_the_readme_defaults_table_matches_the_config() -> None:
    text = README.read_text()
    table = text[text.index("<!-- defaults-table -->") :]
    table = table[: table.index("\n\n")]
    for kind, per_256 in SGD_LR_PER_256.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| SGD lr, {kind}"))
        assert re.search(rf"\b{per_256:g} × batch / 256\b", row), row
        assert f"{per_256 * 64 / 256:g} at batch 64" in row, row
    defaults = TrainConfig()
    assert f"| finetune head epochs | {defaults.transfer.head_epochs} |" in table
    assert f"| finetune stem lr ratio | {defaults.transfer.stem_lr_ratio:g} |" in table
    assert f"| label smoothing | {defaults.optim.label_smoothing:g} |" in table

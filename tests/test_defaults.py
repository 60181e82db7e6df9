"""The defaults that depend on the recipe, the batch and the image size (issue 16): what
:func:`resfit.core.defaults.resolve_config` fills in, what it logs, and that the training guide's table
(docs/guide/training.md) says the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resfit.core.config import AugmentConfig, TrainConfig
from resfit.core.defaults import SGD_LR_PER_256, defaults_note, resolve_config
from resfit.core.presets import SHORT_SCRATCH_EPOCHS, SMALL_IMAGE

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_TABLE = ROOT / "docs" / "guide" / "training.md"  # the site's training guide
PRE = {"mean": [0.5] * 3, "std": [0.2] * 3}


def _resolved(img_size: int | None = None, **options) -> TrainConfig:
    pre = {**PRE, "input_size": img_size} if img_size else PRE
    return resolve_config(TrainConfig.from_options(data="d", **options), ["a", "b"], pre, 224)


@pytest.mark.parametrize(
    "options, lr",
    [
        ({}, 0.05),  # from scratch, batch 64
        ({"weights": "w.pth"}, 0.2),  # from weights: recipe auto is finetune, the head's rate
        ({"weights": "w.pth", "recipe": "plain"}, 0.01),  # every layer at one rate
        ({"weights": "w.pth", "recipe": "finetune"}, 0.2),  # the head's rate
        ({"weights": "w.pth", "recipe": "finetune", "batch_size": 32}, 0.1),  # linear in batch
        ({"weights": "w.pth", "recipe": "finetune", "lr": 0.03}, 0.03),  # given: kept
        ({"weights": "w.pth", "freeze": "backbone"}, 0.2),  # the head alone: the head's rate
        ({"weights": "w.pth", "freeze": "layer2"}, 0.2),  # finetune down to layer2
        ({"weights": "w.pth", "freeze": "layer2", "recipe": "plain"}, 0.01),
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
    # Small images get milder crops than the light preset's 35-100 %.
    assert cfg.augment.resolved().crop_scale == ((0.5, 1.0) if preset == "light" else (0.35, 1.0))


@pytest.mark.parametrize(
    "options, preset",
    [
        ({"img_size": 32, "epochs": 10}, "none"),  # short, from scratch, small: no augmentation
        ({"img_size": 16, "epochs": 3}, "none"),
        ({"img_size": 32, "epochs": 11}, "light"),  # long enough to memorise: crops pay
        ({"img_size": 32, "epochs": 6, "weights": "w.pth"}, "light"),  # from weights
        ({"img_size": 96, "epochs": 6}, "standard"),  # not measured above 64 px: as before
        ({"img_size": 32, "epochs": 6, "augment": "light"}, "light"),  # given: it wins
    ],
)
def test_augment_auto_in_a_short_run_from_scratch(options: dict, preset: str) -> None:
    size = options.pop("img_size")
    cfg = _resolved(img_size=size, **options)
    assert cfg.augment.preset == preset and cfg.to_dict()["augment"]["preset"] == preset
    if preset == "none":
        a = cfg.augment.resolved()
        assert (a.hflip, a.crop_scale, a.mixup) == (0.0, (1.0, 1.0), 0.0)
        note = defaults_note(TrainConfig.from_options(data="d", **options), cfg)
        assert f"augment none ({size} px, from scratch, {options['epochs']} epochs <= 10)" in note


def test_a_given_preset_or_knob_wins_over_auto() -> None:
    given = _resolved(img_size=32, augment="light").augment.resolved()
    assert given.preset == "light" and given.crop_scale == (0.35, 1.0)  # the preset as named
    assert _resolved(img_size=32, augment="standard").augment.preset == "standard"
    aug = AugmentConfig(crop_scale=(0.7, 1.0))  # preset auto, one knob given
    cfg = _resolved(img_size=32, augment=aug)
    assert cfg.augment.preset == "light" and cfg.augment.resolved().crop_scale == (0.7, 1.0)
    assert TrainConfig().augment.resolved().preset == "standard"  # size unknown: standard


def test_finetune_defaults_and_the_log_line() -> None:
    given = TrainConfig.from_options(data="d", weights="w.pth", recipe="finetune")
    assert given.transfer.head_epochs == 1 and given.transfer.stem_lr_ratio == 0.5
    resolved = resolve_config(given, ["a", "b"], {**PRE, "input_size": 32}, 224)
    note = defaults_note(given, resolved)
    assert "lr 0.2 (sgd, batch 64, from weights, recipe finetune, --freeze none)" in note
    assert "augment light, crops 50%-100% (32 px)" in note and "weight decay 0.0005" in note
    explicit = given.replace(lr=0.1, weight_decay=0.0, augment="light")
    assert defaults_note(explicit, resolve_config(explicit, ["a"], PRE, 224)) == ""


def test_the_guide_defaults_table_matches_the_config() -> None:
    text = DEFAULTS_TABLE.read_text()
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
    augment = next(line for line in table.splitlines() if line.startswith("| `--augment auto`"))
    assert f"at {SMALL_IMAGE} px and below" in augment, augment
    assert f"from scratch of {SHORT_SCRATCH_EPOCHS} epochs or fewer" in augment, augment


# -- --lr auto -------------------------------------------------------------------------------

FAST = dict(arch="resnet20_cifar", img_size=16, batch_size=8, epochs=1, progress=False,
            report=False, leakage="off", precise_bn=0)  # fmt: skip


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .images import make_colour_folder

    return make_colour_folder(tmp_path_factory.mktemp("colours") / "data", per_class=8)


def test_lr_auto_sweeps_first_and_trains_at_the_rate_it_chose(colours: Path, tmp_path: Path):
    import json

    from resfit.training import train

    r = train(data=str(colours), out=str(tmp_path / "auto"), lr="auto", **FAST)
    run = tmp_path / "auto"
    assert (run / "lr_find.png").stat().st_size > 1000
    summary = json.loads((run / "lr_find.json").read_text())
    assert summary["rule"] == "steepest descent" and summary["steps"] >= 5
    assert summary["chosen"] == summary["steepest"]
    assert 1e-7 < summary["chosen"] < 10
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == pytest.approx(summary["chosen"]) == r.config.optim.lr
    assert "--lr auto: lr" in (run / "train.log").read_text()  # the sweep is in the run's log


def test_an_explicit_lr_never_sweeps(colours: Path, tmp_path: Path) -> None:
    import json

    from resfit.cli import main

    out = tmp_path / "fixed"
    args = [str(colours), "--out", str(out), "--lr", "0.03", "--arch", "resnet20_cifar",
            "--img-size", "16", "--batch-size", "8", "--epochs", "1", "--no-progress",
            "--no-report", "--leakage", "off"]  # fmt: skip
    assert main(["train", *args]) == 0
    assert not (out / "lr_find.png").exists() and not (out / "lr_find.json").exists()
    assert json.loads((out / "config.json").read_text())["lr"] == 0.03


def test_the_cli_takes_lr_auto_and_names_a_bad_value(capsys: pytest.CaptureFixture) -> None:
    from resfit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "D", "--out", "R", "--lr", "auto"]).lr == "auto"
    assert parser.parse_args(["train", "D", "--out", "R", "--lr", "0.5"]).lr == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "D", "--out", "R", "--lr", "fast"])
    assert "invalid a number or auto value: 'fast'" in capsys.readouterr().err


# -- bench/defaults.py: the suite's tasks are built as described (not run) --------------------


def _bench() -> object:
    import importlib.util
    import sys

    path = ROOT / "bench" / "defaults.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_defaults", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_defaults_suite_builds_its_tasks(tmp_path: Path) -> None:
    bench = _bench()
    assert len(bench.TASKS) >= 5
    data = bench.TASKS["digits"].build(tmp_path, 0.1)  # 10 % of scikit-learn's digits
    for split, lo in (("train", 10), ("val", 3)):
        classes = sorted(p.name for p in (data / split).iterdir())
        assert classes == [str(i) for i in range(10)]
        assert all(len(list((data / split / c).glob("*.png"))) >= lo for c in classes)
    for task in bench.TASKS.values():
        if task.needs_assets and not bench.ASSETS.exists():
            continue
        cfg = TrainConfig.from_options(data=str(data), out=str(tmp_path / "r"),
                                       **bench.fixed_options(task)).check()  # fmt: skip
        assert cfg.optim.lr is None and cfg.augment.preset == "auto"  # the defaults, untouched
        assert task.trials >= 5
    row = dict(task="digits", epochs=10, trials=20, defaults=0.9, best=0.93,
               counts={"COMPLETE": 12, "PRUNED": 8, "FAIL": 0}, wall_s=61.0)  # fmt: skip
    line = "| digits | 10 epochs | 90.0 % | 93.0 % | +3.0 | - | 20 (12/8) | 61 s |"
    assert line in bench.table([row])
    rescored = dict(row, defaults_seeds=[0.9, 0.92], best_seeds=[0.91, 0.95])
    fresh = "| 91.0 % / 93.0 % (+2.0, 2 seeds) |"  # means over the fresh seeds, and their gap
    assert fresh in bench.table([rescored])


def test_the_tune_defaults_trial_gets_the_augmentation_auto_picks() -> None:
    from resfit.apps.tune.space import defaults_of, search_space
    from resfit.apps.tune.study import _sized

    cfg = TrainConfig.from_options(arch="resnet20_cifar")  # no --img-size: the net's 32 px
    params = defaults_of(_sized(cfg), search_space(cfg, ["arch"]))
    assert params["augment"] == "light" and params["crop_min"] == 0.5 and params["lr"] == 0.05
    big = TrainConfig.from_options(arch="resnet18")
    assert defaults_of(_sized(big), search_space(big, ["arch"]))["augment"] == "standard"
    short = cfg.replace(epochs=6)  # trial 0 of a short study from scratch: no augmentation
    params = defaults_of(_sized(short), search_space(short, ["arch", "epochs"]))
    assert params["augment"] == "none" and "crop_min" not in params


@pytest.mark.parametrize(
    "options, recipe",
    [({}, "plain"), ({"weights": "w.pth"}, "finetune"), ({"weights": "w.pth", "recipe": "plain"}, "plain"),
     ({"weights": "w.pth", "freeze": "backbone"}, "finetune"), ({"recipe": "finetune"}, "finetune"),
     ({"weights": "w.pth", "epochs": 1}, "plain"),  # no epoch after the head phase
     ({"weights": "w.pth", "epochs": 2}, "finetune")],
)  # fmt: skip
def test_recipe_auto_is_settled_and_recorded(options: dict, recipe: str) -> None:
    given = TrainConfig.from_options(data="d", **options)
    resolved = resolve_config(given, ["a", "b"], {**PRE, "input_size": 32}, 224)
    assert resolved.transfer.recipe == recipe  # config.json names the recipe the run used
    assert resolved.to_dict()["recipe"] == recipe
    note = defaults_note(given, resolved)
    assert ("(auto)" in note) == ("recipe" not in options and "weights" in options)


def test_recipe_auto_from_weights_with_lr_given_names_it_in_the_log() -> None:
    given = TrainConfig.from_options(data="d", weights="w.pth", lr=0.05)
    note = defaults_note(given, resolve_config(given, ["a"], PRE, 224))
    assert "recipe finetune (auto, from weights)" in note


def test_a_config_json_from_before_recipe_auto_reads_as_plain() -> None:
    d = TrainConfig.from_options(data="d", weights="w.pth").to_dict()
    d["recipe"] = "default"  # what config.json said before the plain recipe had its name
    assert TrainConfig.from_dict(d).transfer.recipe == "plain"

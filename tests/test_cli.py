"""The `resfit` command line: options generated from the config, fast help, resfit's own errors
and --threads. Commands are stubbed where the test is about the CLI, not what it calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from resfit.cli import build_parser, config_from_args, given_options, main
from resfit.core.config import OPTIONS, SECTIONS, TrainConfig, flag
from resfit.core.errors import ConfigError


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


# -- defect 11: help and argument errors answer without importing torch ---------------------------


def test_help_and_argument_errors_do_not_import_torch(tmp_path: Path) -> None:
    script = f"""
import sys
from resfit.cli import main
codes = []
for argv in (["--help"], ["train", "--help"], ["lr-find", "--help"],
             ["train", "D", "--out", "R", "--epochs", "many"],
             ["train", "D", "--out", "R", "--optimizer", "rmsprop"]):
    try:
        main(argv)
    except SystemExit as e:
        codes.append(e.code)
codes.append(main(["train", "D", "--out", {str(tmp_path / "r")!r}, "--epochs", "0"]))
print(codes, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy")))
"""
    res = _python(script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[0, 0, 0, 2, 2, 2] []"
    assert "--epochs must be at least 1" in res.stderr
    assert not (tmp_path / "r").exists()


# -- the train and lr-find options are generated from config.OPTIONS -------------------------------


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_config_option_is_a_flag_with_the_configs_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("train", "--help")
    text = capsys.readouterr().out
    for section in SECTIONS:
        assert f"{section} options:" in text
    for name, info in OPTIONS.items():
        if name == "data" or not info.cli:
            continue
        if info.type is bool:
            spelled = ("--no-" if info.default else "--") + name.replace("_", "-")
            assert spelled in text, name
            continue
        assert flag(name) in text, name
        if info.choices:
            value = info.choices[-1]
            args = _parse("train", "D", "--out", "R", flag(name), str(value))
            assert getattr(args, name) == value
            with pytest.raises(SystemExit):
                _parse("train", "D", "--out", "R", flag(name), "not-a-choice")
    assert "%" not in text.replace("5%", "")  # no unexpanded format codes


def test_the_namespace_holds_only_the_given_options() -> None:
    args = _parse("train", "DATA", "--out", "RUN", "--lr", "0.5", "--no-report", "--ema")
    assert given_options(args) == {"data": "DATA", "out": "RUN", "lr": 0.5, "report": False,
                                   "ema": True}  # fmt: skip
    assert given_options(_parse("--threads", "3", "train", "--out", "RUN", "--resume")) == {
        "out": "RUN",
        "threads": 3,
    }


def test_documented_flags_reach_the_config() -> None:
    argv = ["--weights", "w.pth", "--freeze", "layer2", "--recipe", "finetune", "--head-epochs", "1",
            "--unfreeze", "gradual", "--stem-lr-ratio", "0.2", "--cache", "disk", "--cache-views", "2",
            "--cache-dtype", "fp16", "--no-progress", "--train-bn", "--tensorboard",
            "--early-stopping", "3", "--balance", "weights", "--leakage", "remove", "--precise-bn", "0",
            "--workers", "1", "--val-fraction", "0.2", "--test-fraction", "0.1", "--deterministic",
            "--compile", "--sync-bn", "--grad-clip", "1", "--label-smoothing", "0", "--warmup-epochs",
            "0", "--schedule", "onecycle", "--weight-decay", "0", "--optimizer", "adamw", "--in-chans",
            "1", "--rotation", "5", "--translate", "0.05", "--hflip", "0", "--vflip", "0.5",
            "--color-jitter", "0.1", "--mixup", "0.2", "--cutmix", "1", "--augment", "strong",
            "--arch", "resnet20_cifar", "--img-size", "16", "--epochs", "3", "--batch-size", "8",
            "--lr", "0.01", "--seed", "7", "--device", "cpu", "--precision", "fp32",
            "--no-channels-last", "--no-nesterov", "--ema-decay", "0.9", "--momentum", "0.8"]  # fmt: skip
    args = _parse("train", "DATA", "--out", "RUN", *argv)
    cfg = config_from_args(args)
    given = given_options(args)
    assert len(given) == 2 + sum(a.startswith("--") for a in argv)  # every flag, DATA and --out
    for name in OPTIONS:  # each given value reached its section; the rest kept their defaults
        assert cfg.get(name) == given.get(name, TrainConfig().get(name)), name
    assert cfg.transfer.freeze == "layer2" and cfg.optim.lr == 0.01 and not cfg.optim.nesterov
    assert cfg.augment.preset == "strong" and cfg.augment.rotation == 5.0
    assert not cfg.run.progress and cfg.run.precise_bn == 0 and cfg.model.in_chans == 1


def test_lr_find_takes_the_training_options_and_its_sweep(monkeypatch) -> None:
    import resfit.training.lr_find as lrf

    seen = {}

    def fake_lr_find(cfg, **kw):
        seen.update(cfg=cfg, **kw)
        return SimpleNamespace(suggestion=0.1, lr_min=0.3, plot=Path("p.png"))

    monkeypatch.setattr(lrf, "lr_find", fake_lr_find)
    monkeypatch.setattr("resfit.core.threads.configure", lambda threads=None: 1)
    rc = main(["lr-find", "DATA", "--out", "RUN", "--freeze", "backbone", "--steps", "20",
               "--end-lr", "1"])  # fmt: skip
    assert rc == 0
    assert seen["cfg"].transfer.freeze == "backbone" and seen["cfg"].data.path == "DATA"
    assert (seen["steps"], seen["end_lr"], seen["start_lr"], seen["out"]) == (20, 1.0, 1e-7, "RUN")


# -- defect 8: train passes exactly the given options, with --resume too ---------------------------


@pytest.fixture()
def fake_train(monkeypatch) -> list[dict]:
    import resfit.training as training

    calls: list[dict] = []

    def train(cfg=None, **kw):
        calls.append(kw)
        return SimpleNamespace(history=[], test=None)

    monkeypatch.setattr(training, "train", train)
    monkeypatch.setattr("resfit.core.threads.configure", lambda threads=None: calls.append({"threads": threads}))  # fmt: skip
    return calls


def test_resume_passes_only_the_given_options(fake_train: list[dict]) -> None:
    assert main(["--threads", "3", "train", "--out", "RUN", "--resume", "--epochs", "4"]) == 0
    assert fake_train == [{"threads": 3}, {"resume": True, "out": "RUN", "epochs": 4, "threads": 3}]


def test_train_needs_data_unless_resuming(fake_train: list[dict], capsys) -> None:
    assert main(["train", "--out", "RUN"]) == 2
    assert capsys.readouterr().err == "resfit train: error: no training data given: resfit train DATA --out RUN\n"  # fmt: skip
    assert fake_train == []


# -- defect 12: resfit's own errors in one line, bugs with their traceback -------------------------


def test_a_resfit_bug_keeps_its_traceback() -> None:
    script = """
import resfit.models.resnet as models
def broken(include_plain=True):
    raise ValueError("a bug in resfit")
models.list_models = broken
from resfit.cli import main
raise SystemExit(main(["models"]))
"""
    res = _python(script)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ValueError: a bug in resfit" in res.stderr
    assert "resfit models: error" not in res.stderr


def test_a_config_error_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    import resfit.training as training

    def refuse(cfg=None, **kw):
        raise ConfigError("--lr cannot change mid-run")

    monkeypatch.setattr(training, "train", refuse)
    monkeypatch.setattr("resfit.core.threads.configure", lambda threads=None: 1)
    assert main(["train", "--out", "RUN", "--resume", "--lr", "0.5"]) == 2
    assert capsys.readouterr().err == "resfit train: error: --lr cannot change mid-run\n"


def test_interrupt_exits_130(monkeypatch, capsys) -> None:
    import resfit.models.resnet as models

    def interrupted(include_plain=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "list_models", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_bench_pipeline_without_data_is_a_user_error(capsys) -> None:
    assert main(["bench", "pipeline"]) == 2
    assert "needs --data DIR" in capsys.readouterr().err


# -- --threads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--threads", "2", "eval", "RUN", "DATA"], ["eval", "RUN", "DATA", "--threads", "2"]],
)
def test_threads_are_configured_before_the_command_runs(monkeypatch, argv) -> None:
    import resfit.insight.evaluation as evaluation

    order: list[str] = []
    monkeypatch.setattr("resfit.core.threads.configure", lambda threads=None: order.append(f"threads {threads}"))  # fmt: skip

    def evaluate(*a, **kw):
        order.append("evaluate")
        raise ConfigError("stop here")

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    assert main(argv) == 2
    assert order == ["threads 2", "evaluate"]


def test_listing_commands_leave_the_threads_alone(monkeypatch, capsys) -> None:
    called = []
    monkeypatch.setattr(
        "resfit.core.threads.configure", lambda threads=None: called.append(threads)
    )
    assert main(["models"]) == 0
    assert "resnet50" in capsys.readouterr().out and called == []


def test_predict_help_lists_the_installed_engines(capsys) -> None:
    from resfit.inference.engines import available_engines

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(installed here: {', '.join(available_engines())})" in text

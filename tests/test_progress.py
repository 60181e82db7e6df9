"""Progress output: bars on a terminal, a few plain lines in a file or CI log (issue 31, item 4)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resfit.core.progress import PlainProgress, progress_bar, progress_mode

from .images import make_colour_folder


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_mode_follows_the_stream_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESFIT_PROGRESS", raising=False)
    assert progress_mode(_Terminal()) == "bar"
    assert progress_mode(io.StringIO()) == "lines"
    monkeypatch.setenv("RESFIT_PROGRESS", "off")
    assert progress_mode(_Terminal()) == "off"
    monkeypatch.setenv("RESFIT_PROGRESS", "bar")
    assert progress_mode(io.StringIO()) == "bar"


def test_plain_progress_writes_a_line_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    bar = PlainProgress(range(1000), desc="decoding", every=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="resfit"):
        for _ in bar:
            now[0] += 0.1  # 1000 items over 100 fake seconds
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert bar.n == 1000 and bar.lines == len(lines) == 3, lines
    assert lines[0].startswith("decoding: 300/1000 (30%)"), lines[0]


def test_a_disabled_bar_is_silent(
    capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="resfit"):
        bar = progress_bar(range(5), desc="quiet", enabled=False)
        assert list(bar) == [0, 1, 2, 3, 4]
        bar.set_postfix(loss="0.1")
        bar.close()
    assert caplog.records == [] and capfd.readouterr().err == ""


def test_training_logged_to_a_file_writes_a_few_lines_per_epoch(tmp_path: Path) -> None:
    """The whole `resfit train` output into a file: no carriage returns, no bar redraws, the
    epoch's line once per epoch (tqdm wrote one redraw per batch here before)."""
    data = make_colour_folder(tmp_path / "data", per_class=12, size=16)
    epochs = 3
    log_file = tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k != "RESFIT_PROGRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, "-m", "resfit", "--threads", "1", "train", str(data),
           "--out", str(tmp_path / "run"), "--arch", "resnet20_cifar", "--img-size", "16",
           "--epochs", str(epochs), "--batch-size", "4", "--no-report", "--leakage", "off",
           "--precise-bn", "0", "--precision", "fp32"]  # fmt: skip
    with log_file.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log_file.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert "\r" not in text, text[:2000]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == epochs, text
    # tqdm wrote a redraw with a carriage return every 0.1 s of each epoch here before.
    assert len(lines) <= 20 + 3 * epochs, text

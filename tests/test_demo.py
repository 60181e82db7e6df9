"""`resfit demo`: runs offline on scikit-learn's digits and prints numbers from its own run."""

from __future__ import annotations

from pathlib import Path

import pytest

from resfit.apps.demo import run_demo
from resfit.core.errors import ConfigError


def test_quick_demo_prints_what_it_measured(tmp_path: Path, capsys) -> None:
    res = run_demo(out=tmp_path / "demo", quick=True)
    printed = capsys.readouterr().out
    for name in ("transfer", "scratch"):
        acc = res[name]["test_accuracy"]
        assert 0.2 < acc <= 1.0  # 5 classes: chance is 0.2
        assert f"test accuracy {acc:.3f}" in printed
    assert res["transfer"]["n"] == res["scratch"]["n"] > 700
    assert (tmp_path / "demo" / "transfer" / "model.safetensors").is_file()
    run_demo(out=tmp_path / "demo", quick=True)  # a rerun replaces its own folder


def test_demo_refuses_to_delete_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    # A user error (one line in the CLI), not a bug.
    with pytest.raises(ConfigError, match="not an earlier demo"):
        run_demo(out=tmp_path)
    assert (tmp_path / "mine.txt").exists()

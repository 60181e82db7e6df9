"""``eval --slice-by``: figures per group of a manifest column equal those computed by hand from
the predictions CSV; small groups are flagged; a missing column is one error naming it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from resfit.core.errors import DataError


def _manifest(cifar10_root: Path, path: Path) -> Path:
    """Test photos of airplanes and frogs, each at one of three sites (one site small)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site"])
        for cls in ("airplane", "frog"):
            for i, p in enumerate(sorted((cifar10_root / "test" / cls).glob("*.jpg"))[:60]):
                w.writerow([p, cls, "north" if i < 35 else "south" if i < 55 else "east"])
    return path


def test_slices_equal_the_figures_by_hand(
    airplane_frog_run, cifar10_root, tmp_path, capsys
) -> None:
    from resfit.cli import main

    manifest = _manifest(cifar10_root, tmp_path / "m.csv")
    out = tmp_path / "eval"
    assert main(["eval", str(airplane_frog_run), str(manifest), "--slice-by", "site",
                 "--json", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["slice_by"] == "site"
    site = {r["path"]: r["site"] for r in csv.DictReader(open(manifest))}
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    by_site = {s["slice"]: s for s in summary["slices"]}
    assert set(by_site) == {"north", "south", "east"}
    for name, s in by_site.items():
        rows = [r for r in preds if site[r["path"]] == name]
        assert s["n"] == len(rows) == {"north": 70, "south": 40, "east": 10}[name]
        assert s["accuracy"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
        for cls in ("airplane", "frog"):
            mine = [r for r in rows if r["true"] == cls]
            assert s["recall"][cls] == pytest.approx(np.mean([r["predicted"] == cls for r in mine]))
        assert s["small"] == (name == "east")
    assert summary["accuracy"] > 0.8  # the run tells them apart, so the figures mean something
    assert (out / "slices.csv").is_file()


def test_slice_by_a_missing_column_names_it(airplane_frog_run, cifar10_root, tmp_path) -> None:
    from resfit.insight.evaluation import evaluate

    manifest = _manifest(cifar10_root, tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"m\.csv has no column 'scanner'"):
        evaluate(airplane_frog_run, manifest, slice_by="scanner", out=tmp_path / "e", report=False)

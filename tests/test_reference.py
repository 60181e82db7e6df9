"""Behaviour is unchanged by the redesign: three small fp32 runs end with the weights that the
training code before it produced (``tests/reference/fp32_runs.json``, from commit c7da56a)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resfit.core.config import AugmentConfig
from resfit.training import TrainConfig, train

from .reference.make_reference import REFERENCE, SCENARIOS, run_scenario


def _one_thread_config(**options) -> TrainConfig:
    return TrainConfig.from_options(threads=1, **options)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fp32_run_matches_the_pre_redesign_reference(
    name: str, reference: dict, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was made: the same reductions on every machine
    try:
        got = run_scenario(name, tmp_path, train, _one_thread_config, AugmentConfig)
    finally:
        torch.set_num_threads(threads)
    want = reference[name]
    # fp32 runs are not bit-reproducible across CPU kinds: the random-augmentation run drifts
    # (measured on an AMX Xeon against the Zen 4 reference: val loss 0.39 %, first values of a
    # tensor up to 7 % of themselves, but sums within 0.1 % of the tensor's norm). So each
    # summary is compared relative to its tensor's norm; a changed lr, schedule or loss moves
    # the weights by far more.
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-2, abs=1e-5)
    assert set(got["weights"]) == set(want["weights"])
    for k, w in want["weights"].items():
        g = got["weights"][k]
        norm = w[1] ** 0.5  # w = [sum, sum of squares, first values...]
        assert g[1] == pytest.approx(w[1], rel=5e-3, abs=1e-6), k
        assert [g[0], *g[2:]] == pytest.approx([w[0], *w[2:]], abs=5e-3 * norm + 1e-4), k

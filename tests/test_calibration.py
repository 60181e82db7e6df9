"""Temperature scaling, ECE, reliability diagrams and the bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from resfit.insight.calibration import bootstrap_accuracy_ci, reliability_diagram
from resfit.tasks.calibration import (
    calibrate_temperature,
    expected_calibration_error,
    fit_temperature,
    softmax,
)


def _calibrated_sample(n: int = 20_000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, k))
    p = softmax(z)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, labels


@pytest.mark.parametrize("true_t", [3.0, 0.5])
def test_fit_temperature_recovers_the_distortion(true_t: float) -> None:
    z, labels = _calibrated_sample()
    # Over-confident (logits x3) or under-confident (logits / 2) copies of calibrated logits.
    distorted = torch.tensor(z * true_t, dtype=torch.float32)
    before = distorted.clone()
    with torch.no_grad():  # as an eval loop would call it
        t = fit_temperature(distorted, torch.tensor(labels))
    assert t == pytest.approx(true_t, rel=0.08)
    assert torch.equal(distorted, before)

    probs_before = softmax(distorted.numpy())
    probs_after = softmax(distorted.numpy(), t)
    ece_before = expected_calibration_error(probs_before, labels)
    ece_after = expected_calibration_error(probs_after, labels)
    assert ece_before > 0.05
    assert ece_after < 0.02
    # Scaling never changes a prediction.
    assert np.array_equal(probs_before.argmax(1), probs_after.argmax(1))


def test_fit_temperature_degenerate_inputs_give_one() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    assert fit_temperature(torch.zeros(4, 3), labels) == 1.0  # flat NLL: nothing to fit
    assert fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long)) == 1.0
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    assert fit_temperature(bad, labels) == 1.0
    with pytest.raises(ValueError):
        fit_temperature(torch.randn(4, 3), torch.tensor([0, 1, 3, 0]))


def test_fit_temperature_on_perfectly_separable_data_stays_bounded() -> None:
    # All correct with margin: NLL keeps falling as T -> 0; the clamp keeps T sane.
    logits = torch.eye(4).repeat(5, 1) * 5
    t = fit_temperature(logits, torch.arange(4).repeat(5))
    assert 0.05 <= t < 1.0


def test_ece_by_hand() -> None:
    # Says 90 % every time, right 7 times out of 10: ECE = |0.7 - 0.9| = 0.2.
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 7 + [1] * 3)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.2)
    # Two bins: 0.6 (right 1/2) and 1.0 (right 2/2) -> 0.5*|0.5-0.6| + 0.5*|1-1| = 0.05
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.05)
    z, labels = _calibrated_sample()
    assert expected_calibration_error(softmax(z), labels) < 0.02


def test_reliability_diagram_to_file_and_axes(tmp_path) -> None:
    z, labels = _calibrated_sample(2000)
    out = reliability_diagram(softmax(z * 2), labels, tmp_path / "sub" / "rel.png", title="val")
    assert out == tmp_path / "sub" / "rel.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 200

    ax = Figure().add_subplot()
    assert reliability_diagram(softmax(z * 2), labels, ax, label="before") is ax
    reliability_diagram(softmax(z), labels, ax, label="after", color="tab:orange")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("before: ECE") for t in legend)
    assert any(t.startswith("after: ECE") for t in legend)


def test_bootstrap_accuracy_ci() -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 5, 400)
    y_pred = np.where(rng.random(400) < 0.8, y_true, (y_true + 1) % 5)
    acc = float((y_true == y_pred).mean())
    low, high = bootstrap_accuracy_ci(y_true, y_pred)
    assert low < acc < high
    # Normal approximation: +-1.96 * sqrt(p (1 - p) / n) ~ +-0.039 for p = 0.8, n = 400.
    assert 0.06 < high - low < 0.10
    assert bootstrap_accuracy_ci(y_true, y_pred, seed=0) == (low, high)  # reproducible
    assert bootstrap_accuracy_ci(y_true, y_true) == (1.0, 1.0)
    # More test images, narrower interval.
    big_true, big_pred = np.tile(y_true, 16), np.tile(y_pred, 16)
    b_low, b_high = bootstrap_accuracy_ci(big_true, big_pred, n=300)
    assert b_high - b_low < (high - low) / 2


def _confident_mistakes() -> tuple[torch.Tensor, torch.Tensor]:
    """18 right answers at 90 % and 2 wrong ones at 99.97 %: the NLL optimum is a large T
    that makes every right answer look unsure, so the ECE on these same logits rises."""
    z = torch.zeros(20, 2, dtype=torch.float64)
    z[:18, 0] = 2.2
    z[18:, 1] = 8.0
    return z, torch.zeros(20, dtype=torch.long)


def test_calibrate_temperature_keeps_t_1_when_the_fit_raises_the_ece() -> None:
    # Issue 13, defect 10: the fitted T was kept even though it made the ECE worse.
    z, y = _confident_mistakes()
    fitted = fit_temperature(z, y)
    ece_1 = expected_calibration_error(softmax(z.numpy()), y.numpy())
    ece_fit = expected_calibration_error(softmax(z.numpy(), fitted), y.numpy())
    assert fitted > 2 and ece_fit > ece_1 + 0.1  # the premise: the NLL fit hurts the ECE

    c = calibrate_temperature(z, y)
    assert c.temperature == 1.0 and not c.kept
    assert c.fitted == pytest.approx(fitted)
    assert c.ece_before == pytest.approx(ece_1) and c.ece_after == pytest.approx(ece_1)
    assert c.ece_fitted == pytest.approx(ece_fit)
    assert "would raise the ECE" in c.reason and "kept T = 1" in c.reason
    assert c.to_dict()["kept"] is False


def test_calibrate_temperature_keeps_a_fit_that_helps() -> None:
    z, labels = _calibrated_sample(4000)
    c = calibrate_temperature(torch.tensor(z * 3.0), torch.tensor(labels))
    assert c.kept and c.temperature == c.fitted == pytest.approx(3.0, rel=0.1)
    assert c.ece_after == c.ece_fitted < c.ece_before - 0.05
    assert "lowers the ECE" in c.reason
    flat = calibrate_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 1]))
    assert flat.temperature == 1.0 and not flat.kept and "no temperature" in flat.reason

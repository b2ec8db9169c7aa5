"""engine.model.calibration and the calibration metrics: Platt keeps the order (AUC unchanged) and recovers a
known distortion; isotonic is monotone and fits its training data; ECE against a hand count; round trips and
refusals."""
import numpy as np
import pytest

from engine.config import CalibrationConfig, ScorerConfig
from engine.model.calibration import calibrate, fit_calibration
from engine.training.studies.calibration_metrics import (ece_interval, ece_noise_floor, expected_calibration_error,
                                                         reliability_curve)
from engine.training.studies.metrics import log_loss, roc_auc


def _distorted(n=20000, seed=0):
    """Labels drawn from true probabilities q, and an overconfident score p = sigmoid(3 logit(q) + 1)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < q).astype(np.int64)
    logit_q = np.log(q / (1 - q))
    return y, 1 / (1 + np.exp(-(3 * logit_q + 1))), q


def test_platt_inverts_a_logit_distortion_and_keeps_the_order():
    y, p, q = _distorted()
    cal = fit_calibration(y, p, "platt")
    assert cal.a == pytest.approx(1 / 3, rel=0.05) and cal.b == pytest.approx(-1 / 3, abs=0.05)
    fixed = calibrate(cal, p)
    assert roc_auc(y, fixed) == roc_auc(y, p)
    assert np.all(np.diff(fixed[np.argsort(p)]) >= 0)
    assert log_loss(y, fixed) < log_loss(y, p) - 0.05
    assert expected_calibration_error(y, fixed) < 0.015 < expected_calibration_error(y, p)


def test_isotonic_is_monotone_and_calibrated_on_its_data():
    y, p, _ = _distorted(seed=1)
    cal = fit_calibration(y, p, "isotonic")
    fixed = calibrate(cal, p)
    assert np.all(np.diff(fixed[np.argsort(p)]) >= -1e-12)
    assert expected_calibration_error(y, fixed) < 0.01
    assert abs(fixed.mean() - y.mean()) < 1e-3  # PAV keeps the mean on its training data


@pytest.mark.parametrize("kind", ["platt", "isotonic"])
def test_round_trip_and_dtype(kind):
    y, p, _ = _distorted(n=2000, seed=2)
    cal = fit_calibration(y, p, kind)
    again = ScorerConfig.from_dict(ScorerConfig(calibration=cal).to_dict()).calibration
    probs = p.astype(np.float32)
    assert again == cal and calibrate(again, probs).dtype == np.float32
    np.testing.assert_array_equal(calibrate(again, probs), calibrate(cal, probs))
    assert calibrate(CalibrationConfig(), probs) is probs


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="kind"):
        fit_calibration([0, 1], [0.2, 0.5], "beta")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fit_calibration([0, 1], [0.2, np.nan])
    with pytest.raises(ValueError, match="increasing"):
        fit_calibration([1, 1, 0, 0] * 50, [0.1, 0.2, 0.8, 0.9] * 50)  # scores rank the labels backwards
    with pytest.raises(ValueError, match="a must be > 0"):
        CalibrationConfig("platt", a=-1.0)
    with pytest.raises(ValueError, match="calibration.a must be a finite float, got str"):
        ScorerConfig.from_dict({"calibration": {"kind": "platt", "a": "1", "b": 0}})
    with pytest.raises(ValueError, match="non-decreasing"):
        CalibrationConfig("isotonic", x=(0.1, 0.5), y=(0.6, 0.2))
    with pytest.raises(ValueError, match="kind must be one of"):
        CalibrationConfig("beta")


def test_reliability_curve_against_a_hand_count():
    labels = [0, 1, 1, 0, 1, 1]
    probs = [0.05, 0.05, 0.55, 0.6, 0.95, 1.0]
    curve = reliability_curve(labels, probs, bins=2)
    np.testing.assert_allclose(curve.predicted, [0.05, (0.55 + 0.6 + 0.95 + 1.0) / 4])
    np.testing.assert_allclose(curve.observed, [0.5, 0.75])
    np.testing.assert_allclose(curve.count, [2, 4])
    assert curve.ece == pytest.approx((2 * 0.45 + 4 * abs(0.75 - 0.775)) / 6)


def test_the_noise_floor_shrinks_with_examples_and_bounds_a_calibrated_ece():
    """Perfectly calibrated probabilities: their measured ECE lies under the floor's 95th percentile most of the
    time, and the floor falls about as 1 / sqrt(n)."""
    rng = np.random.default_rng(5)
    small, large = rng.uniform(0.05, 0.95, 2_000), rng.uniform(0.05, 0.95, 32_000)
    floor_small, floor_large = ece_noise_floor(small), ece_noise_floor(large)
    assert floor_small[0] < floor_small[1] and 3 < floor_small[0] / floor_large[0] < 5
    measured = [expected_calibration_error(rng.random(small.size) < small, small) for _ in range(40)]
    assert sum(m <= floor_small[1] for m in measured) >= 34
    y, p, _ = _distorted(n=2000, seed=6)
    assert expected_calibration_error(y, p) > 5 * ece_noise_floor(p)[1]  # a real miscalibration stands out


def test_weights_count_examples_and_the_user_interval_holds_the_ece():
    y, p, _ = _distorted(n=3000, seed=7)
    twice = reliability_curve(np.r_[y, y[:100]], np.r_[p, p[:100]])
    weighted = reliability_curve(y, p, weights=np.r_[np.full(100, 2.0), np.ones(y.size - 100)])
    np.testing.assert_allclose(weighted.observed, twice.observed)
    np.testing.assert_allclose(weighted.count, twice.count)
    users = np.arange(y.size) // 10
    ece, low, high = ece_interval(y, p, users, resamples=200)
    assert ece == expected_calibration_error(y, p) and low < ece < high
    with pytest.raises(ValueError, match="weights"):
        reliability_curve(y, p, weights=np.ones(3))

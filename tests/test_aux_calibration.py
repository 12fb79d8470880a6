"""Calibration metrics on hand-computed inputs, and on simulated calibrated/miscalibrated g."""
import numpy as np
import pytest

from vrpo.aux import calibration as cal

P = [0.9, 0.6, 0.2, 0.5]
Y = [1, 0, 0, 1]


def test_hand_computed_metrics():
    # accuracy: right, wrong, right, tie (counts 1/2) -> 2.5 / 4
    assert cal.accuracy(P, Y) == pytest.approx(0.625)
    # Brier: (0.1^2 + 0.6^2 + 0.2^2 + 0.5^2) / 4 = 0.66 / 4
    assert cal.brier(P, Y) == pytest.approx(0.165)
    # log-loss: -(ln .9 + ln .4 + ln .8 + ln .5) / 4 = (0.1053605 + 0.9162907 + 0.2231436 + 0.6931472) / 4
    assert cal.log_loss(P, Y) == pytest.approx(0.4844855, abs=1e-7)
    # 10 bins, one prediction each: (|.9-1| + |.6-0| + |.2-0| + |.5-1|) / 4 = 1.4 / 4
    assert cal.expected_calibration_error(P, Y, bins=10) == pytest.approx(0.35)
    # 2 bins, closed on the right as scikit-learn's calibration_curve makes them, so 0.5 is in
    # the lower one: [0.2, 0.5] -> |0.35 - 1/2| weight 2/4; [0.9, 0.6] -> |0.75 - 1/2| weight 2/4
    # => (0.15 + 0.25) / 2 = 0.2
    assert cal.expected_calibration_error(P, Y, bins=2) == pytest.approx(0.2)
    count, conf, freq = cal.reliability_bins(P, Y, bins=2)
    assert count.tolist() == [2, 2] and conf.tolist() == pytest.approx([0.35, 0.75]) and freq.tolist() == [0.5, 0.5]
    # an empty bin has no confidence or frequency
    count, conf, freq = cal.reliability_bins([0.1, 0.9], [0, 1], bins=3)
    assert count.tolist() == [1, 0, 1] and np.isnan(conf[1]) and np.isnan(freq[1]) and freq[2] == 1.0


def test_both_orders_keeps_the_scores_of_an_antisymmetric_g():
    rep = cal.calibration_report(P, Y, bins=10)
    assert rep["pairs"] == 4
    assert rep["accuracy"] == pytest.approx(0.625) and rep["brier"] == pytest.approx(0.165)
    assert rep["log_loss"] == pytest.approx(0.4844855, abs=1e-7)
    # 8 predictions: .9/1 .6/0 .2/0 .5/1 and reversed .1/0 .4/1 .8/1 .5/0; the two 0.5s share
    # a bin with frequency 1/2 (error 0); others: (.1 + .6 + .2 + .1 + .6 + .2) / 8 = 0.225
    assert rep["ece"] == pytest.approx(0.225)


def test_calibrated_g_has_small_ece_and_overconfident_g_does_not():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, p.size) < p).astype(float)
    assert cal.expected_calibration_error(p, y) < 0.02
    sharp = np.clip(0.5 + 2 * (p - 0.5), 0, 1)  # twice as confident as the truth
    assert cal.expected_calibration_error(sharp, y) > 0.1
    assert cal.brier(p, y) < cal.brier(sharp, y)


def test_bad_inputs_and_plot(tmp_path):
    with pytest.raises(ValueError, match="3 probabilities but 2 labels"):
        cal.brier([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="no pairs"):
        cal.accuracy([], [])
    cal.plot_reliability(P, Y, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

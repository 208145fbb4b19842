"""Threshold statistics on distributions with known quantiles."""

import math

import numpy as np
import pytest

from calibration.stats import (
    CalibrationStatsError,
    beta_cdf_order,
    defect_report,
    drift_check,
    fit_gpd_pwm,
    gpd_threshold,
    image_threshold,
    ks_two_sample,
    min_samples,
    order_statistic_threshold,
    pixel_threshold,
)


def test_min_samples_hand_computed():
    # the maximum of n scores meets alpha with confidence c when 1 - (1 - alpha)^n >= c
    assert min_samples(0.01, 0.95) == math.ceil(math.log(0.05) / math.log(0.99)) == 299
    assert min_samples(0.001, 0.95) == 2995


def test_beta_cdf_of_order_statistics_hand_computed():
    # k=1: P(p <= a) = 1 - (1 - a)^n
    assert beta_cdf_order(0.1, 1, 10) == pytest.approx(1 - 0.9**10)
    # k=2, n=3: P(Bin(3, .5) >= 2) = 0.5
    assert beta_cdf_order(0.5, 2, 3) == pytest.approx(0.5)


def test_order_statistic_rule_holds_on_fresh_samples():
    """The false-reject rate on new parts from the same distribution stays at or below alpha
    in at least the stated fraction of repeated calibrations."""
    rng = np.random.default_rng(0)
    alpha, conf, n = 0.01, 0.9, 1000
    ok = 0
    trials = 200
    for _ in range(trials):
        thr = order_statistic_threshold(rng.normal(size=n), alpha, conf).threshold
        true_frr = 0.5 * math.erfc(thr / math.sqrt(2))  # exact for N(0, 1)
        ok += true_frr <= alpha
    assert ok / trials >= conf - 0.05
    res = order_statistic_threshold(rng.normal(size=n), alpha, conf)
    assert res.k is not None and 1 <= res.k < n * alpha
    assert res.frr_lower < res.expected_frr < res.frr_upper


def test_order_statistic_refuses_too_few_samples():
    with pytest.raises(CalibrationStatsError, match="at least 2995 are needed"):
        order_statistic_threshold(np.arange(100.0), 0.001, 0.95)


def test_gpd_fit_recovers_a_known_tail():
    rng = np.random.default_rng(1)
    xi, sigma = 0.2, 1.5
    u = rng.random(20000)
    y = sigma / xi * ((1 - u) ** (-xi) - 1)
    xh, sh = fit_gpd_pwm(y)
    assert xh == pytest.approx(xi, abs=0.05) and sh == pytest.approx(sigma, rel=0.05)


def test_gpd_extrapolates_small_alpha_from_few_samples():
    """300 exponential scores, alpha 1e-3 (beyond what 300 samples show): over repeated
    calibrations the true FRR at the fitted threshold centres on alpha and the bootstrap interval
    covers the true quantile most of the time."""
    rng = np.random.default_rng(2)
    alpha = 1e-3
    true_q = -math.log(alpha)  # Exp(1) quantile
    frrs, covered = [], 0
    for _ in range(40):
        res = gpd_threshold(rng.exponential(size=300), alpha, 0.9, n_boot=100)
        assert res.method == "gpd" and res.frr_lower <= res.frr_upper
        frrs.append(math.exp(-res.threshold))
        lo, hi = res.threshold_ci
        covered += lo <= true_q <= hi
    assert alpha / 3 <= float(np.median(frrs)) <= 3 * alpha
    assert covered / 40 >= 0.7


def test_auto_picks_the_rule_and_says_why():
    rng = np.random.default_rng(3)
    big = image_threshold(rng.normal(size=4000), alpha=0.001, confidence=0.95)
    assert big.method == "order_statistic"
    small = image_threshold(rng.normal(size=200), alpha=0.001, confidence=0.95)
    assert small.method == "gpd" and "tail fit" in small.notes[0] and "2995" in small.notes[0]
    with pytest.raises(CalibrationStatsError, match="at least 50"):
        image_threshold(rng.normal(size=20), alpha=0.001)
    with pytest.raises(CalibrationStatsError, match="alpha"):
        image_threshold(rng.normal(size=200), alpha=0.7)


def test_pixel_threshold_and_min_area():
    maps = np.zeros((10, 32, 32), np.float32)
    maps[:, 0, 0] = 5.0  # one hot pixel per good map
    thr, area = pixel_threshold(maps, quantile=0.9995, min_area_floor=1)
    assert thr == pytest.approx(5.0)
    assert area == 2  # the largest good blob has 1 px: one more is needed to call a defect


def test_defect_report_hand_computed():
    good = np.array([0.1, 0.2, 0.3, 0.9])
    defect = np.array([0.5, 0.8, 1.0])
    r = defect_report(good, defect, threshold=0.6)
    assert r["miss_rate"] == pytest.approx(1 / 3)
    assert r["zero_miss_threshold"] == 0.5 and r["frr_at_zero_miss"] == pytest.approx(0.25)
    assert r["overlap"] and "overlap" in r["warning"]
    assert r["auroc"] == pytest.approx(10 / 12)


def test_ks_and_drift():
    rng = np.random.default_rng(4)
    a = rng.normal(size=500)
    d, p = ks_two_sample(a, rng.normal(size=500))
    assert p > 0.01
    d2, p2 = ks_two_sample(a, rng.normal(0.5, 1, size=500))
    assert d2 > d and p2 < 1e-6
    thr = float(np.quantile(a, 0.99))
    same = drift_check(a, rng.normal(size=400), thr, frr_upper=0.02)
    assert not same["recalibrate"]
    shifted = drift_check(a, rng.normal(1.0, 1, size=400), thr, frr_upper=0.02)
    assert shifted["recalibrate"] and len(shifted["reasons"]) == 2

"""Threshold statistics from good-part scores (pure numpy).

Image threshold for a target false-reject rate ``alpha`` (a good part scoring above the threshold
is rejected):

- ``order_statistic``: distribution-free. For the k-th largest of n i.i.d. good scores, the
  probability p that a new good part exceeds it follows Beta(k, n + 1 - k). We take the largest
  k (lowest threshold) with P(p <= alpha) >= confidence. Needs n >= ln(1 - confidence) / ln(1 - alpha).
- ``gpd``: peaks over threshold. A generalised Pareto distribution fitted (probability-weighted
  moments, Hosking & Wallis 1987) to the exceedances over a high empirical quantile extrapolates
  the (1 - alpha) quantile from fewer samples; a bootstrap gives its confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class CalibrationStatsError(ValueError):
    """Too few or unusable samples; the message says how many are needed."""


def _log_binom_pmf(n: int, j: np.ndarray, x: float) -> np.ndarray:
    from math import lgamma

    lg = np.vectorize(lgamma)
    return lg(n + 1) - lg(j + 1) - lg(n - j + 1) + j * math.log(x) + (n - j) * math.log1p(-x)


def beta_cdf_order(alpha: float, k: int, n: int) -> float:
    """P(p <= alpha) for p ~ Beta(k, n + 1 - k) = P(Binomial(n, alpha) >= k)."""
    if k <= 0:
        return 1.0
    j = np.arange(0, k)
    below = np.exp(_log_binom_pmf(n, j, alpha)).sum()
    return float(max(0.0, 1.0 - below))


def beta_quantile_order(q: float, k: int, n: int) -> float:
    """The q-quantile of Beta(k, n + 1 - k) by bisection on ``beta_cdf_order``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if beta_cdf_order(mid, k, n) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def min_samples(alpha: float, confidence: float) -> int:
    """Smallest n for which even the maximum of n good scores meets alpha at this confidence."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - alpha))


@dataclass
class ImageThreshold:
    threshold: float
    method: str  # order_statistic | gpd
    alpha: float
    confidence: float
    n: int
    expected_frr: float  # point estimate of the false-reject rate at the threshold
    frr_lower: float
    frr_upper: float
    k: int | None = None  # order statistic: the k-th largest score
    gpd: dict[str, float] | None = None
    threshold_ci: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.threshold_ci is not None:
            d["threshold_ci"] = list(self.threshold_ci)
        return d


def order_statistic_threshold(scores: np.ndarray, alpha: float, confidence: float = 0.95) -> ImageThreshold:
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    n = len(s)
    need = min_samples(alpha, confidence)
    if n < need:
        msg = (
            f"{n} good scores cannot support a false-reject rate of {alpha:g} at {confidence:.0%} confidence "
            f"with the order-statistic rule: at least {need} are needed"
        )
        raise CalibrationStatsError(msg)
    # largest k with P(p <= alpha) >= confidence (P decreases as k grows)
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if beta_cdf_order(alpha, mid, n) >= confidence:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    # place the threshold just above the k-th largest score ("score > threshold" is rejected ties kept)
    thr = float(s[k - 1])
    return ImageThreshold(
        threshold=thr,
        method="order_statistic",
        alpha=alpha,
        confidence=confidence,
        n=n,
        k=k,
        expected_frr=k / (n + 1),
        frr_lower=beta_quantile_order((1 - confidence) / 2, k, n),
        frr_upper=beta_quantile_order(1 - (1 - confidence) / 2, k, n),
    )


MIN_SHAPE_EXCEEDANCES = 30  # below this the GPD shape is not identifiable: exponential tail (xi = 0)


def fit_gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """(xi, sigma) of a GPD fitted to exceedances by probability-weighted moments.

    With fewer than ``MIN_SHAPE_EXCEEDANCES`` exceedances the shape is fixed at 0 (exponential
    tail, sigma = mean excess): a shape estimated from a handful of points swings the extrapolated
    quantile by orders of magnitude.
    """
    y = np.sort(np.asarray(excess, dtype=np.float64))
    m = len(y)
    if m < 5:
        msg = f"a tail fit needs at least 5 exceedances, got {m}"
        raise CalibrationStatsError(msg)
    if m < MIN_SHAPE_EXCEEDANCES:
        return 0.0, float(max(y.mean(), 1e-12))
    a0 = y.mean()
    j = np.arange(1, m + 1)
    a1 = float(np.sum((m - j) / (m - 1) * y) / m)
    denom = a0 - 2 * a1
    if denom <= 0:
        return 0.0, float(a0)
    k = a0 / denom - 2.0
    sigma = 2.0 * a0 * a1 / denom
    xi = -k
    return float(np.clip(xi, -0.5, 0.3)), float(max(sigma, 1e-12))


def gpd_quantile(u: float, xi: float, sigma: float, tail_frac: float, alpha: float) -> float:
    """Score whose exceedance probability is ``alpha`` given P(S > u) = tail_frac."""
    r = alpha / tail_frac
    if abs(xi) < 1e-6:
        return u - sigma * math.log(r)
    return u + sigma / xi * (r ** (-xi) - 1.0)


def gpd_tail_prob(t: float, u: float, xi: float, sigma: float, tail_frac: float) -> float:
    if t <= u:
        return tail_frac
    z = (t - u) / sigma
    if abs(xi) < 1e-6:
        return tail_frac * math.exp(-z)
    base = 1 + xi * z
    return 0.0 if base <= 0 else tail_frac * base ** (-1 / xi)


def gpd_threshold(
    scores: np.ndarray,
    alpha: float,
    confidence: float = 0.95,
    tail_fraction: float = 0.1,
    n_boot: int = 300,
    seed: int = 0,
) -> ImageThreshold:
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    m = max(round(n * tail_fraction), 10)
    if n < 50 or m >= n:
        msg = f"the tail fit needs at least 50 good scores (100+ recommended), got {n}"
        raise CalibrationStatsError(msg)

    def fit(sample: np.ndarray) -> tuple[float, float, float, float]:
        srt = np.sort(sample)
        u = float(srt[-m - 1])
        xi, sigma = fit_gpd_pwm(srt[-m:] - u)
        return gpd_quantile(u, xi, sigma, m / len(sample), alpha), u, xi, sigma

    thr, u, xi, sigma = fit(s)
    rng = np.random.default_rng(seed)
    boot = np.array([fit(rng.choice(s, n, replace=True))[0] for _ in range(n_boot)])
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    thr_lo, thr_hi = np.quantile(boot, [lo_q, hi_q])
    # the fitted quantile is the threshold; the bootstrap gives its interval and the FRR bounds
    # (the upper bound of an extrapolation from ~100 parts is too unstable to be a threshold)
    chosen = float(thr)
    tail = m / n
    est = gpd_tail_prob(chosen, u, xi, sigma, tail)
    # FRR bounds at the chosen threshold across the bootstrap fits
    frrs = []
    for _ in range(min(n_boot, 200)):
        smp = rng.choice(s, n, replace=True)
        srt = np.sort(smp)
        ub = float(srt[-m - 1])
        xb, sb = fit_gpd_pwm(srt[-m:] - ub)
        frrs.append(gpd_tail_prob(chosen, ub, xb, sb, tail))
    f_lo, f_hi = np.quantile(frrs, [lo_q, hi_q])
    return ImageThreshold(
        threshold=chosen,
        method="gpd",
        alpha=alpha,
        confidence=confidence,
        n=n,
        expected_frr=float(est),
        frr_lower=float(f_lo),
        frr_upper=float(f_hi),
        gpd={"u": u, "xi": xi, "sigma": sigma, "tail_fraction": tail, "point_threshold": thr},
        threshold_ci=(float(thr_lo), float(thr_hi)),
    )


def image_threshold(
    scores: np.ndarray, alpha: float = 0.001, confidence: float = 0.95, method: str = "auto"
) -> ImageThreshold:
    """Order statistic when n supports alpha at this confidence, else the GPD tail fit."""
    s = np.asarray(scores, dtype=np.float64)
    if not 0 < alpha < 0.5:
        msg = f"alpha (target false-reject rate) must be in (0, 0.5), got {alpha}"
        raise CalibrationStatsError(msg)
    if not 0.5 <= confidence < 1:
        msg = f"confidence must be in [0.5, 1), got {confidence}"
        raise CalibrationStatsError(msg)
    if s.size == 0 or not np.isfinite(s).all():
        msg = "good scores are empty or contain NaN/inf"
        raise CalibrationStatsError(msg)
    need = min_samples(alpha, confidence)
    if method == "order_statistic" or (method == "auto" and len(s) >= need):
        return order_statistic_threshold(s, alpha, confidence)
    if method not in ("auto", "gpd"):
        msg = f"method must be auto, order_statistic or gpd, got {method!r}"
        raise CalibrationStatsError(msg)
    try:
        res = gpd_threshold(s, alpha, confidence)
    except CalibrationStatsError as exc:
        msg = f"{exc}; the order-statistic rule would need {need} good parts for alpha={alpha:g}"
        raise CalibrationStatsError(msg) from exc
    if method == "auto":
        res.notes.append(
            f"{len(s)} good parts are fewer than the {need} the distribution-free rule needs for alpha={alpha:g} "
            f"at {confidence:.0%} confidence: the threshold is extrapolated by a tail fit"
        )
    return res


def pixel_threshold(good_maps: np.ndarray, quantile: float = 0.9999, min_area_floor: int = 16) -> tuple[float, int]:
    """Pixel threshold = a high quantile of good pixels; min area = just above the largest blob on good parts."""
    import cv2

    maps = np.asarray(good_maps, dtype=np.float32)
    thr = float(np.quantile(maps, quantile))
    largest = 0
    for m in maps:
        mask = (m >= thr).astype(np.uint8)
        if mask.any():
            _, _, st, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            largest = max(largest, int(st[1:, cv2.CC_STAT_AREA].max()))
    return thr, max(min_area_floor, largest + 1)


def defect_report(good: np.ndarray, defect: np.ndarray, threshold: float) -> dict[str, Any]:
    """Miss rate at the threshold, F1-optimal and zero-miss thresholds, ROC AUC, overlap warning."""
    from engines.metrics import auroc, f1_max

    good = np.asarray(good, np.float64)
    defect = np.asarray(defect, np.float64)
    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    scores = np.r_[good, defect]
    f1, f1_thr = f1_max(labels, scores)
    zero_miss = float(defect.min())
    out = {
        "n_defect": len(defect),
        "auroc": auroc(labels, scores),
        "miss_rate": float(np.mean(defect < threshold)),
        "false_reject_rate_on_given_good": float(np.mean(good >= threshold)),
        "f1_max": f1,
        "f1_threshold": f1_thr,
        "zero_miss_threshold": zero_miss,
        "frr_at_zero_miss": float(np.mean(good >= zero_miss)),
        "overlap": bool(good.max() >= defect.min()),
    }
    if out["overlap"]:
        out["warning"] = (
            f"good and defect scores overlap ({int((good >= defect.min()).sum())} good parts score above the "
            f"weakest defect): no threshold separates them all"
        )
    return out


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov statistic and asymptotic p-value."""
    a = np.sort(np.asarray(a, np.float64))
    b = np.sort(np.asarray(b, np.float64))
    allv = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, allv, side="right") / len(a)
    cdf_b = np.searchsorted(b, allv, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))


def drift_check(
    reference: np.ndarray, new: np.ndarray, threshold: float, frr_upper: float, p_limit: float = 0.01
) -> dict[str, Any]:
    """Compare a new batch of good scores with the calibration's; say when recalibration is due."""
    d, p = ks_two_sample(reference, new)
    observed = float(np.mean(np.asarray(new) >= threshold))
    reasons = []
    if p < p_limit:
        reasons.append(f"score distribution changed (KS D={d:.3f}, p={p:.2g} < {p_limit})")
    # binomial check: is the observed FRR implausible under the calibrated upper bound?
    n = len(new)
    k = round(observed * n)
    if k > 0 and beta_cdf_order(frr_upper, k, n) < 0.01:
        reasons.append(
            f"false-reject rate {observed:.2%} on {n} good parts exceeds the calibrated bound {frr_upper:.2%}"
        )
    return {
        "ks_statistic": d,
        "p_value": p,
        "observed_frr": observed,
        "n": n,
        "recalibrate": bool(reasons),
        "reasons": reasons,
    }

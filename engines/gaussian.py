"""A multivariate Gaussian of good parts' pooled features: Ledoit-Wolf covariance and its whitening.

The image-level term of the model (``engines.model.GlobalTerm``, after Rippel et al., "Modeling the
distribution of normal data in pre-trained deep features for anomaly detection", ICPR 2020) scores
a part by the Mahalanobis distance of its pooled teacher features to this Gaussian. With a few
hundred good parts and a few hundred dimensions the sample covariance is singular or close to it;
Ledoit and Wolf's shrinkage towards a scaled identity ("A well-conditioned estimator for
large-dimensional covariance matrices", 2004) gives a well-conditioned one with no setting to tune.
Numpy only, float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianFit:
    mean: np.ndarray  # (D,)
    whiten: np.ndarray  # (D, D): ||(x - mean) @ whiten|| is the Mahalanobis distance
    shrinkage: float  # Ledoit-Wolf's weight of the scaled identity, 0..1
    n: int  # samples it was fitted on


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, shrunk covariance and shrinkage of samples ``x`` (N, D).

    Covariance ``(1 - s) S + s mu I`` with S the (1/N) sample covariance, mu its mean eigenvalue and
    s = min(b2, d2) / d2, where d2 = ||S - mu I||_F^2 and b2 = (1/N^2) sum_k ||x_k x_k^T - S||_F^2
    (x_k centred), both divided by D as in the paper.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        msg = f"the Gaussian needs at least 2 samples of shape (N, D), got {x.shape}"
        raise ValueError(msg)
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = float(np.trace(s)) / d
    d2 = float(((s - mu * np.eye(d)) ** 2).sum()) / d
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - N ||S||^2  (expanded, no N x D x D tensor)
    sq = (xc * xc).sum(axis=1)
    b2 = float((sq * sq).sum() / n**2 - (s * s).sum() / n) / d
    shrink = 0.0 if d2 <= 0 else min(max(b2, 0.0), d2) / d2
    cov = (1.0 - shrink) * s + shrink * mu * np.eye(d)
    return mean, cov, shrink


def fit_gaussian(x: np.ndarray) -> GaussianFit:
    """The Ledoit-Wolf Gaussian of ``x`` (N, D) with a whitening matrix W, W W^T = cov^-1 (Cholesky)."""
    mean, cov, shrink = ledoit_wolf(x)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    try:
        whiten = np.linalg.cholesky(precision)
    except np.linalg.LinAlgError as exc:
        msg = "the good parts' feature covariance is not positive definite (are all images identical?)"
        raise ValueError(msg) from exc
    return GaussianFit(mean=mean, whiten=whiten, shrinkage=shrink, n=len(x))


def mahalanobis(fit: GaussianFit, x: np.ndarray) -> np.ndarray:
    """Distance of each row of ``x`` (N, D) to the fitted Gaussian."""
    y = (np.asarray(x, dtype=np.float64) - fit.mean) @ fit.whiten
    return np.sqrt((y * y).sum(axis=1))

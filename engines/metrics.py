"""Evaluation metrics in plain numpy: AUROC, ROC curve, F1-max, AU-PRO."""

from __future__ import annotations

import cv2
import numpy as np


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        msg = f"labels ({labels.size}) and scores ({scores.size}) differ in length"
        raise ValueError(msg)
    if not np.isfinite(scores).all():
        msg = "scores contain NaN or infinite values"
        raise ValueError(msg)
    return labels, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted as one half).

    NaN when one of the classes is empty.
    """
    labels, scores = _check_binary(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average ranks over ties (1-based)
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for "score >= threshold is positive", thresholds descending."""
    labels, scores = _check_binary(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thr = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thr


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it (score >= t is defective)."""
    labels, scores = _check_binary(labels, scores)
    if not labels.any():
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[distinct].astype(np.float64)
    predicted = (distinct + 1).astype(np.float64)
    precision = tp / predicted
    recall = tp / y.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(s[distinct][i])


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, steps: int = 300) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to 0..1.

    ``masks``: (N, H, W) bool ground truth; ``maps``: (N, H, W) anomaly scores. Each connected
    ground-truth region counts equally (MVTec AD / Bergmann et al. 2021). NaN with no region.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    if masks.shape != maps.shape:
        msg = f"masks {masks.shape} and maps {maps.shape} differ in shape"
        raise ValueError(msg)
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise ValueError(msg)
    regions: list[np.ndarray] = []
    for m, a in zip(masks, maps, strict=True):
        if not m.any():
            continue
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        for r in range(1, n):
            regions.append(np.sort(a[lab == r]))
    negatives = np.sort(maps[~masks])
    if not regions or negatives.size == 0:
        return float("nan")
    # Thresholds placed so the FPR grid covers [0, fpr_limit] evenly.
    fpr_grid = np.linspace(0.0, fpr_limit, steps + 1)
    idx = np.clip(np.ceil((1.0 - fpr_grid) * negatives.size).astype(np.int64) - 1, 0, negatives.size - 1)
    thresholds = np.nextafter(negatives[idx], np.float32(np.inf))
    thresholds[0] = np.inf  # fpr 0 -> nothing flagged
    # fpr and pro for "score >= threshold"
    fpr = 1.0 - np.searchsorted(negatives, thresholds, side="left") / negatives.size
    pro = np.zeros_like(fpr)
    for reg in regions:
        pro += 1.0 - np.searchsorted(reg, thresholds, side="left") / reg.size
    pro /= len(regions)
    # interpolate exactly at the limit, then integrate
    keep = fpr <= fpr_limit
    f, p = fpr[keep], pro[keep]
    if f[-1] < fpr_limit:
        j = int(np.argmax(fpr > fpr_limit)) if (fpr > fpr_limit).any() else None
        if j is not None and fpr[j] > f[-1]:
            p_lim = p[-1] + (pro[j] - p[-1]) * (fpr_limit - f[-1]) / (fpr[j] - f[-1])
        else:
            p_lim = p[-1]
        f, p = np.r_[f, fpr_limit], np.r_[p, p_lim]
    return float(np.trapezoid(p, f) / fpr_limit)

"""Self-contained HTML calibration report: plots drawn with OpenCV, embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

W, H, M = 640, 320, 48  # plot size and margin
GOOD = (200, 140, 40)  # BGR
DEFECT = (40, 60, 220)
LINE = (20, 20, 20)


def _png(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _canvas() -> np.ndarray:
    return np.full((H, W, 3), 255, np.uint8)


def _axes(img: np.ndarray, x0: float, x1: float, xlabel: str, ylabel: str) -> None:
    cv2.line(img, (M, H - M), (W - 10, H - M), LINE, 1)
    cv2.line(img, (M, 10), (M, H - M), LINE, 1)
    for i in range(5):
        v = x0 + (x1 - x0) * i / 4
        x = int(M + (W - 10 - M) * i / 4)
        cv2.line(img, (x, H - M), (x, H - M + 4), LINE, 1)
        cv2.putText(img, f"{v:.2f}", (x - 16, H - M + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, LINE, 1)
    cv2.putText(img, xlabel, (W // 2 - 40, H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, LINE, 1)
    cv2.putText(img, ylabel, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, LINE, 1)


def histogram_plot(good: np.ndarray, defect: np.ndarray, threshold: float) -> np.ndarray:
    img = _canvas()
    allv = np.r_[good, defect, [threshold]]
    lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1
    bins = np.linspace(lo, hi, 41)
    hg, _ = np.histogram(good, bins)
    hd, _ = np.histogram(defect, bins) if len(defect) else (np.zeros(40), None)
    hg = hg / max(len(good), 1)
    hd = hd / max(len(defect), 1)
    top = max(hg.max(), hd.max(), 1e-9)
    pw = (W - 10 - M) / 40
    for i in range(40):
        x = int(M + i * pw)
        for vals, color, off in ((hg, GOOD, 0), (hd, DEFECT, pw / 2)):
            h = int((H - M - 10) * vals[i] / top)
            if h:
                cv2.rectangle(img, (int(x + off), H - M - h), (int(x + off + pw / 2) - 1, H - M), color, -1)
    tx = int(M + (W - 10 - M) * (threshold - lo) / (hi - lo))
    cv2.line(img, (tx, 10), (tx, H - M), (0, 0, 0), 2)
    cv2.putText(img, "threshold", (tx + 4, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "good", (W - 120, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.45, GOOD, 1)
    if len(defect):
        cv2.putText(img, "defect", (W - 70, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.45, DEFECT, 1)
    _axes(img, lo, hi, "image score", "fraction")
    return img


def roc_plot(good: np.ndarray, defect: np.ndarray) -> np.ndarray:
    from engines.metrics import roc_curve

    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    fpr, tpr, _ = roc_curve(labels, np.r_[good, defect])
    img = _canvas()
    pts = np.stack([M + fpr * (W - 10 - M), (H - M) - tpr * (H - M - 10)], 1).astype(np.int32)
    cv2.line(img, (M, H - M), (W - 10, 10), (180, 180, 180), 1)
    cv2.polylines(img, [pts], False, DEFECT, 2)
    _axes(img, 0, 1, "false-reject rate (good parts)", "detection rate")
    return img


def _thumb(img: np.ndarray | None, amap: np.ndarray, hi: float) -> str | None:
    from engines.evaluate import heat_overlay

    if img is None:
        return None
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    rgb = cv2.cvtColor(cv2.resize(img, (amap.shape[1], amap.shape[0]), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return _png(heat_overlay(rgb, amap, 0.0, hi))


@dataclass
class ScoredParts:
    """One group of scored parts for the report: names, image scores, maps and an image loader."""

    names: list[str]
    scores: np.ndarray
    maps: np.ndarray | None
    loader: Callable | None


def write_report(
    path: Path, cal, img_thr, good: ScoredParts, defects: ScoredParts, dreport, n_examples: int = 6
) -> Path:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lineinspect calibration</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        ".warn{background:#fee;border:1px solid #c00;padding:8px}.ex img{width:160px;margin:4px}"
        ".ex figure{display:inline-block;margin:4px;font-size:12px}</style></head><body>",
        f"<h1>Calibration {esc(cal.id)}</h1>",
        "<table>",
        f"<tr><th>model (ONNX sha256)</th><td>{esc(cal.model_onnx_sha256)}</td></tr>",
        f"<tr><th>created</th><td>{esc(cal.created_at)}</td></tr>",
        f"<tr><th>image threshold</th><td>{cal.image_threshold:.4f} (rule: {esc(img_thr.method)})</td></tr>",
        f"<tr><th>target false-reject rate</th><td>{img_thr.alpha:.3%} at "
        f"{img_thr.confidence:.0%} confidence</td></tr>",
        f"<tr><th>expected false-reject rate</th><td>{img_thr.expected_frr:.3%} "
        f"(interval {img_thr.frr_lower:.3%} .. {img_thr.frr_upper:.3%})</td></tr>",
        f"<tr><th>pixel threshold / min area</th><td>{cal.pixel_threshold:.4f} / {cal.min_defect_area_px} px</td></tr>",
        f"<tr><th>good parts</th><td>{len(good.scores)}</td></tr>",
        f"<tr><th>defect parts</th><td>{len(defects.scores)}</td></tr>",
        "</table>",
    ]
    for note in img_thr.notes:
        parts.append(f"<p><em>{esc(note)}</em></p>")
    if dreport:
        parts.append("<h2>Defects</h2><table>")
        for key in ("auroc", "miss_rate", "f1_max", "f1_threshold", "zero_miss_threshold", "frr_at_zero_miss"):
            parts.append(f"<tr><th>{esc(key)}</th><td>{dreport[key]:.4f}</td></tr>")
        parts.append("</table>")
        if dreport.get("warning"):
            parts.append(f"<p class='warn'>{esc(dreport['warning'])}</p>")
    parts.append("<h2>Score histogram</h2>")
    parts.append(f"<img alt='histogram' src='{histogram_plot(good.scores, defects.scores, cal.image_threshold)}'>")
    if len(defects.scores):
        parts.append("<h2>ROC</h2>")
        parts.append(f"<img alt='roc' src='{roc_plot(good.scores, defects.scores)}'>")
    hi = max(cal.pixel_threshold * 1.5, 1e-3)
    for title, group in (("Highest-scoring good parts", good), ("Defect parts", defects)):
        if group.maps is None or not len(group.scores) or group.loader is None:
            continue
        parts.append(f"<h2>{esc(title)}</h2><div class='ex'>")
        for i in np.argsort(-group.scores)[:n_examples]:
            src = _thumb(group.loader(group.names[i]), group.maps[i], hi)
            if src:
                parts.append(
                    f"<figure><img src='{src}'><figcaption>{esc(group.names[i])}<br>"
                    f"score {group.scores[i]:.3f}</figcaption></figure>"
                )
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path

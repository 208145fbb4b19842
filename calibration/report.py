"""Self-contained HTML calibration report: charts drawn with matplotlib (Agg) and part thumbnails,
embedded as base64 PNG data URIs (the file opens anywhere, offline)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

GOOD = "#2e7fb8"
DEFECT = "#c62828"


def _png(img: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _figure_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (Agg backend: no display, no window)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _new_figure():
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    fig = Figure(figsize=(7.2, 3.4))
    return fig, fig.add_subplot(1, 1, 1)


def histogram_plot(good: np.ndarray, defect: np.ndarray, threshold: float) -> str:
    """PNG data URI: good and defect score histograms (share of each group) and the threshold."""
    good = np.asarray(good, np.float64)
    defect = np.asarray(defect, np.float64)
    allv = np.r_[good, defect, [threshold]]
    lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1
    bins = np.linspace(lo, hi, 41)
    fig, ax = _new_figure()
    ax.hist(good, bins, weights=np.full(len(good), 1 / max(len(good), 1)), color=GOOD, alpha=0.75, label="good")
    if len(defect):
        w = np.full(len(defect), 1 / len(defect))
        ax.hist(defect, bins, weights=w, color=DEFECT, alpha=0.6, label="defect")
    ax.axvline(threshold, color="black", lw=2, ls="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("image score")
    ax.set_ylabel("share of parts")
    ax.legend(loc="upper right", frameon=False)
    ax.grid(alpha=0.3)
    return _figure_uri(fig)


def roc_plot(good: np.ndarray, defect: np.ndarray) -> str:
    """PNG data URI: detection rate against false-reject rate."""
    from engines.metrics import roc_curve

    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    fpr, tpr, _ = roc_curve(labels, np.r_[good, defect])
    fig, ax = _new_figure()
    ax.plot([0, 1], [0, 1], color="#aaaaaa", lw=1)
    ax.plot(fpr, tpr, color=DEFECT, lw=2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-reject rate (good parts)")
    ax.set_ylabel("detection rate (defect parts)")
    ax.grid(alpha=0.3)
    return _figure_uri(fig)


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
        ".ex figure{display:inline-block;margin:4px;font-size:12px}img.plot{max-width:100%}</style></head><body>",
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
    hist = histogram_plot(good.scores, defects.scores, cal.image_threshold)
    parts.append(f"<img class='plot' alt='histogram' src='{hist}'>")
    if len(defects.scores):
        parts.append("<h2>ROC</h2>")
        parts.append(f"<img class='plot' alt='roc' src='{roc_plot(good.scores, defects.scores)}'>")
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

"""What the station page shows live: the latest inspected frame per camera and the recent parts.

The inspection loop calls ``LiveBoard.record`` once per verdict: an append and a reference swap
under a lock held for microseconds, never any image work. Pictures are drawn only when a page
asks for them, at most once per verdict (``LiveBoard.picture``), in the page's thread.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edge_app.frame import Verdict


@dataclass(frozen=True)
class RecentPart:
    """One verdict as the trend chart and the rates see it (no pixels)."""

    key: str
    camera_id: str
    part_id: str
    verdict: str
    reason: str | None
    score: float | None
    threshold: float | None
    t_decided: float
    latency_ms: dict[str, float]


@dataclass(frozen=True)
class LiveFrame:
    """The latest inspected frame of one camera, with what the page needs to draw it."""

    verdict: Verdict  # holds the image and the anomaly map
    seq_no: int  # increases with every new frame of this camera


def draw_live(v: Verdict, width: int = 480) -> np.ndarray:
    """BGR picture: the part, its heatmap blended in, defect boxes; scaled to ``width`` pixels wide."""
    from engines.evaluate import heat_overlay

    img = v.image
    if img is None:
        return np.full((width * 3 // 4, width, 3), 40, np.uint8)
    bgr = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    h, w = bgr.shape[:2]
    if v.amap is not None:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        amap = cv2.resize(v.amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        hi = max(float(v.threshold or 0) * 1.5, float(np.max(v.amap)), 1e-3)
        bgr = heat_overlay(rgb, amap, 0.0, hi)
    scale = width / w
    out = cv2.resize(bgr, (width, max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    color = (40, 40, 230) if v.verdict == "ng" else (60, 200, 60)
    for r in v.regions:
        x, y, bw, bh = (round(c * scale) for c in r["bbox"])
        cv2.rectangle(out, (x, y), (x + max(bw, 1), y + max(bh, 1)), color, 2)
    return out


class LiveBoard:
    def __init__(self, recent: int = 2000):
        self._lock = threading.Lock()
        self._latest: dict[str, LiveFrame] = {}
        self._recent: collections.deque[RecentPart] = collections.deque(maxlen=recent)
        self._pictures: dict[str, tuple[str, bytes]] = {}  # camera -> (verdict key, JPEG)
        self._picture_lock = threading.Lock()
        self.version = 0  # increases with every verdict: a page waits for it to change

    def record(self, v: Verdict) -> None:
        """Called by the line for every verdict: cheap, no copies, no drawing."""
        part = RecentPart(
            v.key, v.camera_id, v.part_id, v.verdict, v.reason, v.score, v.threshold, v.t_decided, v.latency_ms
        )
        with self._lock:
            self._recent.append(part)
            if v.image is not None:
                prev = self._latest.get(v.camera_id)
                self._latest[v.camera_id] = LiveFrame(v, (prev.seq_no + 1) if prev else 1)
            self.version += 1

    def latest(self) -> dict[str, LiveFrame]:
        with self._lock:
            return dict(self._latest)

    def recent(self, n: int | None = None) -> list[RecentPart]:
        with self._lock:
            parts = list(self._recent)
        return parts if n is None else parts[-n:]

    def picture(self, camera_id: str) -> tuple[str, bytes] | None:
        """(verdict key, JPEG) of the camera's latest frame, drawn once per verdict."""
        frame = self.latest().get(camera_id)
        if frame is None:
            return None
        key = frame.verdict.key
        with self._picture_lock:
            cached = self._pictures.get(camera_id)
            if cached and cached[0] == key:
                return cached
            ok, buf = cv2.imencode(".jpg", draw_live(frame.verdict), [cv2.IMWRITE_JPEG_QUALITY, 80])
            if not ok:
                return None
            self._pictures[camera_id] = (key, buf.tobytes())
            return self._pictures[camera_id]

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Verdicts per minute over the last minute, and the latency percentiles of the recent parts."""
        now = time.time() if now is None else now
        parts = self.recent()
        last_minute = [p for p in parts if now - p.t_decided <= 60.0]
        out: dict[str, float] = {"verdicts_per_min": float(len(last_minute))}
        stages = sorted({s for p in parts for s in p.latency_ms})
        for stage in stages:
            vals = np.array([p.latency_ms[stage] for p in parts if stage in p.latency_ms], np.float64)
            if len(vals):
                out[f"{stage}_p50_ms"] = float(np.percentile(vals, 50))
                out[f"{stage}_p99_ms"] = float(np.percentile(vals, 99))
        return out

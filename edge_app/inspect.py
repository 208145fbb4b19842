"""Inspect and decide: preprocess per model.json, run the runtime, find defect regions, decide.

No torch: the network is reached through ``engines.runtime`` (numpy in, numpy out).
"""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np

from calibration.calibfile import Calibration
from edge_app.decide import Inspected, NotInspected, Outcome, decide
from edge_app.frame import Frame, Verdict
from engines.data import preprocess

log = logging.getLogger(__name__)


def find_regions(amap: np.ndarray, pixel_threshold: float, min_area_px: int, scale: tuple[float, float]) -> list[dict]:
    """Connected components of ``amap >= pixel_threshold`` with at least ``min_area_px`` pixels.

    Areas and boxes are in model pixels; ``scale`` (sx, sy) maps boxes back to camera pixels.
    """
    mask = (amap >= pixel_threshold).astype(np.uint8)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    sx, sy = scale
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area_px:
            continue
        regions.append(
            {
                "area_px": area,
                "bbox": [round(x * sx), round(y * sy), round(w * sx), round(h * sy)],
                "max_score": round(float(amap[labels == i].max()), 4),
            }
        )
    regions.sort(key=lambda r: -r["max_score"])
    return regions


class Inspector:
    """Holds the runtime and the current calibration (swappable at run time: SIGHUP / MQTT).

    ``inspect`` says what a frame shows (``Inspected``) or why it could not be looked at
    (``NotInspected``); ``edge_app.decide.decide`` turns that into the verdict.
    """

    def __init__(self, runtime, calibration: Calibration, station: str):
        self.runtime = runtime
        self.size = runtime.size
        self.station = station
        self._cal = calibration
        self._lock = threading.Lock()
        self.model_sha = runtime.model_sha256

    @property
    def calibration(self) -> Calibration:
        with self._lock:
            return self._cal

    def set_calibration(self, cal: Calibration) -> None:
        if cal.model_onnx_sha256 != self.model_sha:
            msg = "calibration is for another model"
            raise ValueError(msg)
        with self._lock:
            self._cal = cal

    def decide(
        self, frame: Frame, outcome: Outcome, deadline_ms: float | None = None, cal: Calibration | None = None
    ) -> Verdict:
        """``cal``: the calibration ``inspect`` used (a reload in between must not mix two)."""
        cal = cal or self.calibration
        return decide(frame, outcome, cal, self.station, self.model_sha, time.time(), deadline_ms, time.monotonic())

    def inspect(self, frame: Frame, t_dequeued: float, cal: Calibration | None = None) -> Outcome:
        """One frame -> what it shows. Runtime errors become NotInspected (reason runtime_error)."""
        if frame.error:
            return NotInspected(frame.error, frame.detail)
        if frame.image is None or frame.image.dtype != np.uint8:
            kind = "no image" if frame.image is None else f"a {frame.image.dtype} image"
            return NotInspected(
                "unsupported_image",
                f"{kind}: the model takes 8-bit images (set the camera's pixel format to Mono8 / BGR8, "
                "or convert the files to 8 bit)",
            )
        cal = cal or self.calibration
        t0 = time.perf_counter()
        try:
            img = preprocess(frame.image, self.size)
            t1 = time.perf_counter()
            out = self.runtime(img[None])
            t2 = time.perf_counter()
        except Exception as exc:  # any runtime failure still yields this frame's verdict
            log.exception("[%s] inspection failed for part %s", frame.camera_id, frame.part_id)
            return NotInspected("runtime_error", f"{type(exc).__name__}: {exc}")
        amap = out["anomaly_map"][0]
        score = float(out["score"][0])
        h, w = frame.image.shape[:2]
        regions = find_regions(amap, cal.pixel_threshold, cal.min_defect_area_px, (w / self.size[1], h / self.size[0]))
        t3 = time.perf_counter()
        latency = {
            "queue": round((t_dequeued - frame.t_mono) * 1000, 3),
            "preprocess": round((t1 - t0) * 1000, 3),
            "inference": round((t2 - t1) * 1000, 3),
            "decide": round((t3 - t2) * 1000, 3),
        }
        return Inspected(score=score, amap=amap, regions=regions, latency_ms=latency)

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
    """Holds the runtime and the current calibration (swappable at run time: SIGHUP / MQTT)."""

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

    def not_inspected(self, frame: Frame, reason: str, detail: str = "") -> Verdict:
        cal = self.calibration
        return Verdict(
            station=self.station,
            camera_id=frame.camera_id,
            seq=frame.seq,
            part_id=frame.part_id,
            verdict="not_inspected",
            reason=reason,
            t_grab=frame.t_grab,
            t_decided=time.time(),
            threshold=cal.image_threshold,
            model_sha=self.model_sha,
            calibration_id=cal.id,
            detail=detail or frame.detail,
            image=frame.image,
        )

    def inspect(self, frame: Frame, t_dequeued: float) -> Verdict:
        """One frame -> one verdict. Runtime errors become not_inspected (reason runtime_error)."""
        if frame.error:
            return self.not_inspected(frame, frame.error)
        cal = self.calibration
        t0 = time.perf_counter()
        try:
            img = preprocess(frame.image, self.size)
            t1 = time.perf_counter()
            out = self.runtime(img[None])
            t2 = time.perf_counter()
        except Exception as exc:  # any runtime failure still yields this frame's verdict
            log.exception("[%s] inspection failed for part %s", frame.camera_id, frame.part_id)
            return self.not_inspected(frame, "runtime_error", f"{type(exc).__name__}: {exc}")
        amap = out["anomaly_map"][0]
        score = float(out["score"][0])
        h, w = frame.image.shape[:2]
        regions = find_regions(amap, cal.pixel_threshold, cal.min_defect_area_px, (w / self.size, h / self.size))
        t3 = time.perf_counter()
        if score >= cal.image_threshold:
            verdict, reason = "ng", "score"
        elif regions:
            verdict, reason = "ng", "region"
        else:
            verdict, reason = "ok", None
        latency = {
            "queue": round((t_dequeued - frame.t_mono) * 1000, 3),
            "preprocess": round((t1 - t0) * 1000, 3),
            "inference": round((t2 - t1) * 1000, 3),
            "decide": round((t3 - t2) * 1000, 3),
        }
        return Verdict(
            station=self.station,
            camera_id=frame.camera_id,
            seq=frame.seq,
            part_id=frame.part_id,
            verdict=verdict,
            reason=reason,
            t_grab=frame.t_grab,
            t_decided=time.time(),
            score=round(score, 5),
            threshold=cal.image_threshold,
            regions=regions[:20],
            latency_ms=latency,
            model_sha=self.model_sha,
            calibration_id=cal.id,
            detail=frame.detail,
            image=frame.image,
            amap=amap,
        )

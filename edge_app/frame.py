"""What flows through the service: a Frame per trigger, a Verdict per Frame."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One trigger of one camera. ``image`` is None when the grab failed (``error`` says why)."""

    camera_id: str
    seq: int  # per-camera sequence number, +1 per trigger (failed ones included)
    part_id: str
    t_grab: float  # time.time() of the capture
    image: np.ndarray | None = None  # uint8, (H, W) mono or (H, W, 3) BGR
    error: str | None = None  # not_inspected reason: grab_failed, skipped_buffer, incomplete_image, ...
    detail: str = ""
    block_id: int | None = None
    t_mono: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Verdict:
    """Made only by ``edge_app.decide.decide``; never changed after (``dataclasses.replace`` makes copies)."""

    station: str
    camera_id: str
    seq: int
    part_id: str
    verdict: str  # ok | ng | not_inspected
    reason: str | None  # for not_inspected, and for ng: "score" / "region"
    t_grab: float
    t_decided: float
    score: float | None = None
    threshold: float | None = None
    regions: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    model_sha: str | None = None
    calibration_id: str | None = None
    detail: str = ""
    # kept in memory for the archive only, never stored in the log
    image: np.ndarray | None = None
    amap: np.ndarray | None = None

    @property
    def key(self) -> str:
        """Idempotency key: station + camera + part id + seq (unique per trigger)."""
        return f"{self.station}/{self.camera_id}/{self.part_id}/{self.seq}"

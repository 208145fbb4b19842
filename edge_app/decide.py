"""The one place that makes verdicts: a pure function of (frame, what inspection found, calibration, clock).

Every verdict the service emits comes from ``decide``: ok / ng from an inference, and every
``not_inspected`` (grab failure, incomplete image, queue overrun, pause, deadline, runtime error,
a service restart that found the trigger without a verdict). The verdict it returns is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.calibfile import Calibration
from edge_app.frame import Frame, Verdict

# every not_inspected reason the service gives (README: "Verdict reasons")
NOT_INSPECTED_REASONS = (
    "grab_failed",  # the camera reported a failed grab
    "skipped_buffer",  # the camera skipped buffers: triggers without an image
    "incomplete_image",  # a truncated or half-written image file / buffer
    "unsupported_image",  # e.g. a 16-bit image for an 8-bit model
    "queue_overrun",  # the inspection queue was full
    "paused",  # inspection paused by command
    "late",  # past decision.deadline_ms
    "runtime_error",  # the runtime failed on this frame
    "service_restart",  # grabbed, then the service stopped (crash) before deciding
)


@dataclass(frozen=True)
class Inspected:
    """What inspection found on one frame."""

    score: float
    amap: np.ndarray
    regions: list[dict] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NotInspected:
    """Why a frame was not inspected."""

    reason: str
    detail: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)
    score: float | None = None  # decided too late: the score it had, for the record

    def __post_init__(self) -> None:
        if self.reason not in NOT_INSPECTED_REASONS:
            msg = f"unknown not_inspected reason {self.reason!r}; known: {', '.join(NOT_INSPECTED_REASONS)}"
            raise ValueError(msg)


Outcome = Inspected | NotInspected


def decide(
    frame: Frame,
    outcome: Outcome,
    cal: Calibration,
    station: str,
    model_sha: str | None,
    t_decided: float,
    deadline_ms: float | None = None,
    t_mono_decided: float | None = None,
) -> Verdict:
    """One frame -> one verdict.

    ng when the score reaches the image threshold ("score") or a region passes the pixel threshold
    and minimum area ("region"); not_inspected when ``outcome`` says so, or when the decision came
    after ``deadline_ms`` from the grab (monotonic clock: ``t_mono_decided - frame.t_mono``).
    """
    latency = dict(outcome.latency_ms)
    total_ms = (t_decided - frame.t_grab) * 1000
    latency.setdefault("total", round(total_ms, 3))
    if isinstance(outcome, Inspected) and deadline_ms and t_mono_decided is not None:
        since_grab = (t_mono_decided - frame.t_mono) * 1000
        if since_grab > deadline_ms:
            verdict = "ng" if outcome.score >= cal.image_threshold or outcome.regions else "ok"
            detail = (
                f"decided {verdict} (score {outcome.score:.5g}) after {since_grab:.0f} ms "
                f"> deadline {deadline_ms:.0f} ms"
            )
            outcome = NotInspected("late", detail, outcome.latency_ms, outcome.score)
    common = {
        "station": station,
        "camera_id": frame.camera_id,
        "seq": frame.seq,
        "part_id": frame.part_id,
        "t_grab": frame.t_grab,
        "t_decided": t_decided,
        "threshold": cal.image_threshold,
        "latency_ms": latency,
        "model_sha": model_sha,
        "calibration_id": cal.id,
        "image": frame.image,
    }
    if isinstance(outcome, NotInspected):
        return Verdict(
            verdict="not_inspected",
            reason=outcome.reason,
            score=None if outcome.score is None else round(float(outcome.score), 5),
            detail=outcome.detail or frame.detail,
            **common,
        )
    if outcome.score >= cal.image_threshold:
        verdict, reason = "ng", "score"
    elif outcome.regions:
        verdict, reason = "ng", "region"
    else:
        verdict, reason = "ok", None
    return Verdict(
        verdict=verdict,
        reason=reason,
        score=round(float(outcome.score), 5),
        regions=outcome.regions[:20],
        detail=frame.detail,
        amap=outcome.amap,
        **common,
    )

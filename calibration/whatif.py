"""What a different image threshold would have done to parts already logged (the page's what-if).

A part is rejected at threshold ``t`` when its image score reaches ``t`` or when it had a defect
region over the pixel threshold (that rule does not move with the image threshold), exactly as
``edge_app.decide`` decides. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ScoredPart(Protocol):
    score: float
    has_region: bool
    review: str | None  # "false_reject", "confirmed_defect" or None


@dataclass(frozen=True)
class WhatIf:
    threshold: float
    parts: int  # recent inspected parts counted
    rejected: int  # of those, rejected at this threshold
    rejected_now: int  # of those, rejected at the current threshold
    current_threshold: float
    marked_false_rejects: int  # parts an operator marked as false rejects
    false_rejects_still_rejected: int
    confirmed_defects: int  # parts an operator confirmed as defective
    confirmed_defects_passing: int  # confirmed defects this threshold would let through

    @property
    def reject_rate(self) -> float:
        return self.rejected / self.parts if self.parts else 0.0

    @property
    def reject_rate_now(self) -> float:
        return self.rejected_now / self.parts if self.parts else 0.0


def rejected_at(part: ScoredPart, threshold: float) -> bool:
    return part.score >= threshold or part.has_region


def check_threshold(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        msg = f"the threshold must be a finite number, got {value!r}"
        raise ValueError(msg)
    if not 0 < value < 1e6:
        msg = f"the threshold must be above 0 and below 1e6, got {value:g}"
        raise ValueError(msg)
    return float(value)


def what_if(threshold: float, current: float, recent: Sequence[ScoredPart], reviewed: Sequence[ScoredPart]) -> WhatIf:
    threshold = check_threshold(threshold)
    fr = [p for p in reviewed if p.review == "false_reject"]
    cd = [p for p in reviewed if p.review == "confirmed_defect"]
    return WhatIf(
        threshold=threshold,
        parts=len(recent),
        rejected=sum(rejected_at(p, threshold) for p in recent),
        rejected_now=sum(rejected_at(p, current) for p in recent),
        current_threshold=current,
        marked_false_rejects=len(fr),
        false_rejects_still_rejected=sum(rejected_at(p, threshold) for p in fr),
        confirmed_defects=len(cd),
        confirmed_defects_passing=sum(not rejected_at(p, threshold) for p in cd),
    )

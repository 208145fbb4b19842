"""The calibration file (YAML): thresholds bound to one model export. Pure Python + numpy."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMAT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Calibration:
    model_onnx_sha256: str
    image_threshold: float
    pixel_threshold: float
    min_defect_area_px: int
    method: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    expected_false_reject_rate: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Short content hash: what a verdict records as its calibration id."""
        key = json.dumps(
            [
                self.model_onnx_sha256,
                self.image_threshold,
                self.pixel_threshold,
                self.min_defect_area_px,
                self.created_at,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_onnx_sha256": self.model_onnx_sha256,
            "created_at": self.created_at,
            "thresholds": {
                "image_score": self.image_threshold,
                "pixel": self.pixel_threshold,
                "min_defect_area_px": self.min_defect_area_px,
            },
            "method": self.method,
            "samples": self.samples,
            "expected_false_reject_rate": self.expected_false_reject_rate,
            **({"extra": self.extra} if self.extra else {}),
        }


def save_calibration(cal: Calibration, path: Path) -> Path:
    from engines.bundle import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(cal.to_dict(), sort_keys=False).encode())
    return path


def _num(d: dict, key: str, path: Path) -> float:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        msg = f"{path}: thresholds.{key} must be a finite number, got {v!r}"
        raise CalibrationError(msg)
    return float(v)


def load_calibration(path: Path, model_onnx_sha256: str | None = None) -> Calibration:
    """Read and check a calibration file; refuse one made for another model export."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        msg = f"cannot read calibration file {path}: {exc.strerror or exc}"
        raise CalibrationError(msg) from exc
    except yaml.YAMLError as exc:
        msg = f"calibration file {path} is not valid YAML: {exc}"
        raise CalibrationError(msg) from exc
    if not isinstance(data, dict):
        msg = f"calibration file {path} must be a mapping"
        raise CalibrationError(msg)
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        msg = f"{path}: unsupported calibration format_version {version!r} (this lineinspect reads {FORMAT_VERSION})"
        raise CalibrationError(msg)
    th = data.get("thresholds")
    if not isinstance(th, dict):
        msg = f"{path}: missing 'thresholds' section"
        raise CalibrationError(msg)
    area = th.get("min_defect_area_px")
    if not isinstance(area, int) or isinstance(area, bool) or area < 1:
        msg = f"{path}: thresholds.min_defect_area_px must be a positive integer, got {area!r}"
        raise CalibrationError(msg)
    sha = data.get("model_onnx_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        msg = f"{path}: model_onnx_sha256 must be the 64-hex sha256 of the model's ONNX file, got {sha!r}"
        raise CalibrationError(msg)
    if model_onnx_sha256 is not None and sha != model_onnx_sha256:
        msg = (
            f"calibration {path} was made for model {sha[:12]}..., but the loaded model is "
            f"{model_onnx_sha256[:12]}...: recalibrate with 'lineinspect calibrate' for this model"
        )
        raise CalibrationError(msg)
    return Calibration(
        model_onnx_sha256=sha,
        image_threshold=_num(th, "image_score", path),
        pixel_threshold=_num(th, "pixel", path),
        min_defect_area_px=area,
        method=data.get("method") or {},
        samples=data.get("samples") or {},
        expected_false_reject_rate=data.get("expected_false_reject_rate") or {},
        created_at=str(data.get("created_at", "")),
        extra=data.get("extra") or {},
    )


def with_image_threshold(cal: Calibration, threshold: float, user: str, created_at: str) -> Calibration:
    """A copy of ``cal`` with a hand-set image threshold (the page's apply): the pixel rule, the
    model binding and the good scores stay; the expected false-reject rate is re-read off the
    calibration's own good scores."""
    from calibration.whatif import check_threshold

    threshold = check_threshold(threshold)
    good = [float(s) for s in cal.extra.get("good_scores") or []]
    expected = {
        "target": cal.expected_false_reject_rate.get("target"),
        "note": "threshold set by hand; this calibration holds no good scores, so the rate at it is not known",
    }
    if good:
        k = sum(s >= threshold for s in good)
        expected = {
            "estimate": k / len(good),
            "observed_on_calibration_parts": f"{k}/{len(good)}",
            "target": cal.expected_false_reject_rate.get("target"),
            "note": "threshold set by hand; the estimate is the share of the calibration's good parts at or above it",
        }
    method = dict(cal.method)
    method["image"] = {
        "method": "manual",
        "set_by": user,
        "replaces": {"calibration_id": cal.id, "threshold": cal.image_threshold, "method": cal.method.get("image")},
    }
    return Calibration(
        model_onnx_sha256=cal.model_onnx_sha256,
        image_threshold=threshold,
        pixel_threshold=cal.pixel_threshold,
        min_defect_area_px=cal.min_defect_area_px,
        method=method,
        samples=cal.samples,
        expected_false_reject_rate=expected,
        created_at=created_at,
        extra=cal.extra,
    )


def replace_calibration(cal: Calibration, path: Path, model_onnx_sha256: str) -> Path | None:
    """Write ``cal`` over ``path`` the validated way: bound to this model, read back and checked
    before it replaces the old file, which is kept beside it as ``<name>.<old id>.yaml``."""
    path = Path(path)
    if cal.model_onnx_sha256 != model_onnx_sha256:
        msg = "calibration is for another model"
        raise CalibrationError(msg)
    from engines.bundle import atomic_write_bytes

    kept = None
    if path.is_file():
        old = load_calibration(path)
        kept = path.with_name(f"{path.stem}.{old.id}{path.suffix or '.yaml'}")
        atomic_write_bytes(kept, path.read_bytes())
    tmp = path.with_name(f".{path.name}.new")
    save_calibration(cal, tmp)
    try:
        check = load_calibration(tmp, model_onnx_sha256)
        if check.id != cal.id:
            msg = f"calibration {tmp} did not read back as written"
            raise CalibrationError(msg)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return kept

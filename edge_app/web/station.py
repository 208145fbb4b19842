"""What the page may see and do on the running service: one typed facade, so that the web code
never reaches into the service's parts (and the service never imports the web code's types)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.calibfile import Calibration, replace_calibration, with_image_threshold
from edge_app.live import LiveBoard
from edge_app.logview import LogView
from edge_app.store import Row

if TYPE_CHECKING:
    from edge_app.service import Service


@dataclass(frozen=True)
class Snapshot:
    """Line health as the page shows it."""

    station: str
    state: str
    reasons: list[str]
    paused: bool
    uptime_s: float
    verdicts: dict[str, int]
    not_inspected: dict[str, int]
    queue_depth: int
    outbox_backlog: int
    unstored: int
    mqtt_connected: bool
    mqtt_error: str | None
    cameras: dict[str, str]
    rates: dict[str, float]
    calibration_id: str
    threshold: float


@dataclass(frozen=True)
class ModelInfo:
    bundle: str
    backend: str
    device: str
    precision: str
    describe: str
    model_sha256: str
    image_size: str  # "W x H" of the model input
    net: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None  # <bundle>/eval/metrics.json when the bundle has been evaluated


@dataclass(frozen=True)
class Applied:
    ok: bool
    message: str
    calibration_id: str
    kept: str | None = None


# where a marked part's image is collected: the layout lineinspect train / calibrate / evaluate read
REVIEW_FOLDERS = {"false_reject": "train/good", "confirmed_defect": "test/confirmed"}


def _precision(model_cfg) -> str:
    p = getattr(model_cfg, "precision", None)
    if p:
        return str(p)
    return "fp16" if getattr(model_cfg, "fp16", None) else "f32"


class Station:
    def __init__(self, svc: Service):
        self._svc = svc
        self.board: LiveBoard = svc.board
        self.log = LogView(svc.cfg.storage.database)
        cfg = svc.cfg
        self.name = f"{cfg.station.line}/{cfg.station.station}"
        self.review_dir = Path(cfg.web.review_dir or Path(cfg.storage.archive_dir).parent / "review")

    def close(self) -> None:
        self.log.close()

    # --- reading ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        svc = self._svc
        m = svc.metrics
        with m.lock:
            ni = {
                dict(lab).get("reason", "?"): int(v) for (n, lab), v in m.counters.items() if n == "not_inspected_total"
            }
        cal = svc.inspector.calibration
        return Snapshot(
            station=self.name,
            state=svc.health.state,
            reasons=list(svc.health.reasons),
            paused=svc.paused.is_set(),
            uptime_s=round(time.time() - svc.started_at, 1),
            verdicts={k: int(svc.counts.get(k, 0)) for k in ("ok", "ng", "not_inspected")},
            not_inspected=ni,
            queue_depth=svc.queue.qsize(),
            # the gauge housekeeping sets every tick: the page never queries under the line's log lock
            outbox_backlog=int(m.get("outbox_backlog")),
            unstored=svc.outbox.waiting(),
            mqtt_connected=bool(svc.publisher.connected),
            mqtt_error=svc.publisher.last_error,
            cameras=dict(svc.cam_states),
            rates=self.board.rates(),
            calibration_id=cal.id,
            threshold=cal.image_threshold,
        )

    def calibration(self) -> Calibration:
        return self._svc.inspector.calibration

    def calibration_file(self) -> Path:
        return Path(self._svc.cfg.calibration.file)

    def camera_ids(self) -> list[str]:
        return [c.cam.id for c in self._svc.cameras]

    def model(self) -> ModelInfo:
        from engines.bundle import read_meta

        svc = self._svc
        bundle = Path(svc.cfg.model.bundle)
        meta = read_meta(bundle)
        acc = None
        metrics = bundle / "eval" / "metrics.json"
        if metrics.is_file():
            try:
                acc = json.loads(metrics.read_text())
            except (OSError, ValueError):
                acc = {"error": f"{metrics} cannot be read"}
        rt = svc.runtime
        return ModelInfo(
            bundle=str(bundle),
            backend=rt.name,
            device=str(rt.device),
            precision=_precision(svc.cfg.model),
            describe=rt.describe(),
            model_sha256=rt.model_sha256,
            image_size=f"{rt.size[1]} x {rt.size[0]}",
            net=dict(meta.get("net") or {}),
            training={k: v for k, v in (meta.get("training") or {}).items() if not isinstance(v, (list, dict))},
            accuracy=acc,
        )

    def archived(self, row: Row) -> tuple[Path, Path]:
        return self._svc.archive.files_for(row.t_grab, row.camera_id, row.part_id, row.seq, row.verdict)

    # --- changing (the page checks the login and writes the audit row first) --------------------
    def apply_threshold(self, threshold: float, user: str) -> Applied:
        from engines.bundle import utc_now

        svc = self._svc
        old = svc.inspector.calibration
        new = with_image_threshold(old, threshold, user, utc_now())
        kept = replace_calibration(new, self.calibration_file(), svc.runtime.model_sha256)
        res = svc.reload_calibration()  # exactly what SIGHUP does
        kept_s = str(kept) if kept else None
        if not res.get("ok"):
            return Applied(False, f"written but not loaded: {res.get('error')}", old.id, kept_s)
        return Applied(True, f"threshold {new.image_threshold:g} in use", res["calibration_id"], kept_s)

    def pause(self) -> None:
        self._svc.command("pause", {})

    def resume(self) -> None:
        self._svc.command("resume", {})

    def mark(self, row: Row, label: str, user: str) -> str | None:
        """Record the operator's word on a part and collect its archived image where train and
        calibrate read: false rejects are good parts (train/good), confirmed defects go to
        test/confirmed. Returns the collected file (None when the image was not archived)."""
        image, _ = self.archived(row)
        dest = None
        if image.is_file():
            dest = self.review_dir / REVIEW_FOLDERS[label] / image.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, dest)
            for other, folder in REVIEW_FOLDERS.items():  # a changed mind moves the file
                if other != label:
                    (self.review_dir / folder / image.name).unlink(missing_ok=True)
        self._svc.db.set_review(row.key, label, user, str(dest) if dest else None)
        return str(dest) if dest else None

    def audit(self, user: str, remote: str, action: str, detail: dict[str, Any]) -> int:
        return self._svc.db.add_audit(user, remote, action, detail)

    def audit_outcome(self, audit_id: int, outcome: str) -> None:
        self._svc.db.finish_audit(audit_id, outcome)

"""Decision log (SQLite, WAL) that is also the MQTT outbox, and the image archive under a quota.

A verdict is written here before it is published and marked delivered on the broker's ack; after
an outage or a restart the undelivered rows are published again, oldest first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_app.frame import Verdict

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    station TEXT NOT NULL,
    camera_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    part_id TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('ok', 'ng', 'not_inspected')),
    reason TEXT,
    score REAL,
    threshold REAL,
    regions TEXT NOT NULL,
    latency TEXT NOT NULL,
    model_sha TEXT,
    calibration_id TEXT,
    detail TEXT,
    t_grab REAL NOT NULL,
    t_decided REAL NOT NULL,
    created_at REAL NOT NULL,
    published_at REAL,
    delivered_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS verdicts_undelivered ON verdicts (id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS verdicts_created ON verdicts (created_at);
-- a grabbed trigger, durable before it is inspected; deleted with the insert of its verdict
CREATE TABLE IF NOT EXISTS triggers (
    camera_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    part_id TEXT NOT NULL,
    t_grab REAL NOT NULL,
    detail TEXT,
    PRIMARY KEY (camera_id, seq)
);
CREATE INDEX IF NOT EXISTS verdicts_part ON verdicts (part_id);
CREATE INDEX IF NOT EXISTS verdicts_decided ON verdicts (t_decided);
-- who changed the station from the page, when and what (written before the change is made)
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    user TEXT NOT NULL,
    remote TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'pending'
);
-- an operator's word on a part: a false reject or a confirmed defect (the latest mark counts)
CREATE TABLE IF NOT EXISTS reviews (
    key TEXT PRIMARY KEY,
    label TEXT NOT NULL CHECK (label IN ('false_reject', 'confirmed_defect')),
    user TEXT NOT NULL,
    t REAL NOT NULL,
    file TEXT
);
"""

REVIEW_LABELS = ("false_reject", "confirmed_defect")


class StoreError(RuntimeError):
    """The decision log cannot be written (disk full, read-only, corrupt)."""


class StoreUnavailableError(StoreError):
    """Transient: the disk is full, read-only or failing. The same write may succeed later."""


class DuplicateVerdictError(StoreError):
    """Permanent: a verdict with this key is already logged. Retrying can never succeed."""


@dataclass(frozen=True)
class PendingTrigger:
    """A trigger that was grabbed and made durable but never got a verdict (the service stopped)."""

    camera_id: str
    seq: int
    part_id: str
    t_grab: float
    detail: str


@dataclass
class Row:
    id: int | None  # None: a verdict waiting in memory for a writable log (edge_app.outbox)
    key: str
    station: str
    camera_id: str
    seq: int
    part_id: str
    verdict: str
    reason: str | None
    score: float | None
    threshold: float | None
    regions: list
    latency: dict
    model_sha: str | None
    calibration_id: str | None
    detail: str | None
    t_grab: float
    t_decided: float
    created_at: float
    published_at: float | None
    delivered_at: float | None
    attempts: int


class DecisionLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=5)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            msg = f"cannot open the decision log {self.path}: {exc}"
            raise StoreError(msg) from exc
        self.lock = threading.Lock()

    def insert(
        self, v: Verdict, published_at: float | None = None, delivered_at: float | None = None, attempts: int = 0
    ) -> int:
        """Log a verdict (its trigger row goes in the same transaction). ``published_at`` /
        ``delivered_at`` / ``attempts`` carry the state of a verdict published before it was stored."""
        now = time.time()
        row = (
            v.key,
            v.station,
            v.camera_id,
            v.seq,
            v.part_id,
            v.verdict,
            v.reason,
            v.score,
            v.threshold,
            json.dumps(v.regions),
            json.dumps(v.latency_ms),
            v.model_sha,
            v.calibration_id,
            v.detail,
            v.t_grab,
            v.t_decided,
            now,
            published_at,
            delivered_at,
            attempts,
        )
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                cur = self.db.execute(
                    "INSERT INTO verdicts (key, station, camera_id, seq, part_id, verdict, reason, score, threshold,"
                    " regions, latency, model_sha, calibration_id, detail, t_grab, t_decided, created_at,"
                    " published_at, delivered_at, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                self.db.execute("DELETE FROM triggers WHERE camera_id = ? AND seq = ?", (v.camera_id, v.seq))
                self.db.execute("COMMIT")
                return int(cur.lastrowid)
            except sqlite3.IntegrityError as exc:
                self._rollback()
                msg = f"verdict key {v.key} is already in the log (duplicate trigger id?)"
                raise DuplicateVerdictError(msg) from exc
            except sqlite3.Error as exc:
                self._rollback()
                raise self._unavailable("write to", exc) from exc

    def record_trigger(self, camera_id: str, seq: int, part_id: str, t_grab: float, detail: str = "") -> None:
        """Make a grabbed trigger durable before it is inspected (a crash then cannot eat it)."""
        with self.lock:
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO triggers (camera_id, seq, part_id, t_grab, detail) VALUES (?,?,?,?,?)",
                    (camera_id, seq, part_id, t_grab, detail),
                )
            except sqlite3.Error as exc:
                raise self._unavailable("record a trigger in", exc) from exc

    def pending_triggers(self) -> list[PendingTrigger]:
        """Triggers without a verdict, in grab order (camera, seq)."""
        with self.lock:
            cur = self.db.execute(
                "SELECT camera_id, seq, part_id, t_grab, COALESCE(detail, '') FROM triggers"
                " ORDER BY t_grab, camera_id, seq"
            )
            return [PendingTrigger(*r) for r in cur.fetchall()]

    def _rollback(self) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    def _unavailable(self, what: str, exc: sqlite3.Error) -> StoreUnavailableError:
        return StoreUnavailableError(f"cannot {what} the decision log {self.path}: {exc}")

    def pending(self, after_id: int = 0, limit: int = 100) -> list[Row]:
        return self._read(
            lambda: [
                self._row(r)
                for r in self.db.execute(
                    "SELECT * FROM verdicts WHERE delivered_at IS NULL AND id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            ]
        )

    def mark_published(self, key: str, t: float) -> None:
        with self.lock:
            try:
                self.db.execute("UPDATE verdicts SET published_at = ?, attempts = attempts + 1 WHERE key = ?", (t, key))
            except sqlite3.Error as exc:
                raise self._unavailable("write to", exc) from exc

    def mark_delivered(self, key: str, t: float) -> None:
        with self.lock:
            try:
                self.db.execute("UPDATE verdicts SET delivered_at = ? WHERE key = ? AND delivered_at IS NULL", (t, key))
            except sqlite3.Error as exc:
                raise self._unavailable("write to", exc) from exc

    def add_audit(self, user: str, remote: str, action: str, detail: dict[str, Any]) -> int:
        """The audit row of a change, written before the change is made (no row: no change)."""
        with self.lock:
            try:
                cur = self.db.execute(
                    "INSERT INTO audit (t, user, remote, action, detail) VALUES (?,?,?,?,?)",
                    (time.time(), user, remote, action, json.dumps(detail, sort_keys=True)),
                )
                return int(cur.lastrowid)
            except sqlite3.Error as exc:
                raise self._unavailable("write the audit row to", exc) from exc

    def finish_audit(self, audit_id: int, outcome: str) -> None:
        with self.lock:
            try:
                self.db.execute("UPDATE audit SET outcome = ? WHERE id = ?", (outcome[:500], audit_id))
            except sqlite3.Error as exc:
                raise self._unavailable("write to", exc) from exc

    def set_review(self, key: str, label: str, user: str, file: str | None) -> None:
        if label not in REVIEW_LABELS:
            msg = f"review label must be one of {', '.join(REVIEW_LABELS)}"
            raise ValueError(msg)
        with self.lock:
            try:
                self.db.execute(
                    "INSERT OR REPLACE INTO reviews (key, label, user, t, file) VALUES (?,?,?,?,?)",
                    (key, label, user, time.time(), file),
                )
            except sqlite3.Error as exc:
                raise self._unavailable("write the review to", exc) from exc

    def last_seq(self, camera_id: str) -> int:
        """Highest sequence number used by a camera, verdicts and pending triggers alike: sequence
        numbers continue across restarts and crashes, never given to another part."""
        return self._read(
            lambda: int(
                self.db.execute(
                    "SELECT MAX(s) FROM (SELECT MAX(seq) AS s FROM verdicts WHERE camera_id = ?"
                    " UNION ALL SELECT MAX(seq) FROM triggers WHERE camera_id = ?)",
                    (camera_id, camera_id),
                ).fetchone()[0]
                or 0
            )
        )

    def backlog(self) -> int:
        return self._read(
            lambda: int(self.db.execute("SELECT COUNT(*) FROM verdicts WHERE delivered_at IS NULL").fetchone()[0])
        )

    def count(self) -> int:
        return self._read(lambda: int(self.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]))

    def rows(self) -> list[Row]:
        return self._read(
            lambda: [self._row(r) for r in self.db.execute("SELECT * FROM verdicts ORDER BY id").fetchall()]
        )

    def purge_delivered_before(self, t: float) -> int:
        with self.lock:
            try:
                return self.db.execute(
                    "DELETE FROM verdicts WHERE delivered_at IS NOT NULL AND created_at < ?", (t,)
                ).rowcount
            except sqlite3.Error as exc:
                raise self._unavailable("purge", exc) from exc

    def _read(self, fn):
        with self.lock:
            try:
                return fn()
            except sqlite3.Error as exc:
                raise self._unavailable("read", exc) from exc

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @staticmethod
    def _row(r: tuple) -> Row:
        vals = list(r)
        vals[10] = json.loads(vals[10])
        vals[11] = json.loads(vals[11])
        return Row(*vals)


# ------------------------------------------------------------------------------------------------
# image archive
# ------------------------------------------------------------------------------------------------
def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120]


class Archive:
    """Writes part images + heatmap overlays in a background thread; never blocks the line.

    Deletes the oldest files when the folder grows past the quota; a full disk drops the item
    (counted, logged) instead of stopping inspection.
    """

    def __init__(self, root: Path, quota_mb: float, queue_size: int = 32):
        self.root = Path(root)
        self.quota = int(quota_mb * 1024 * 1024)
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.written = 0
        self.deleted = 0
        self.errors = 0
        self.size = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.size = sum(p.stat().st_size for p in self.root.rglob("*.png"))

    def start(self) -> None:
        self.thread.start()

    def submit(self, v: Verdict) -> bool:
        if v.image is None:
            return False
        try:
            self.q.put_nowait(v)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("archive queue full: image of %s not archived", v.key)
            return False

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        while not (self._stop.is_set() and self.q.empty()):
            try:
                v = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._write(v)
            except Exception as exc:
                self.errors += 1
                log.error("archive write failed for %s: %s", v.key, exc)

    def files_for(self, t_grab: float, camera_id: str, part_id: str, seq: int, verdict: str) -> tuple[Path, Path]:
        """Where a verdict's image and heatmap overlay are (or would be) archived: the one naming rule."""
        day = time.strftime("%Y-%m-%d", time.localtime(t_grab))
        stem = f"{int(t_grab * 1000)}_{_safe(camera_id)}_{_safe(part_id)}_{seq}_{verdict}"
        folder = self.root / day
        return folder / f"{stem}.png", folder / f"{stem}_heat.png"

    def _write(self, v: Verdict) -> None:
        image_path, heat_path = self.files_for(v.t_grab, v.camera_id, v.part_id, v.seq, v.verdict)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        img = v.image
        files = [(image_path, img)]
        if v.amap is not None:
            from engines.evaluate import heat_overlay

            rgb = cv2.cvtColor(img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), cv2.COLOR_BGR2RGB)
            rgb = cv2.resize(rgb, (v.amap.shape[1], v.amap.shape[0]), interpolation=cv2.INTER_AREA)
            lo = 0.0
            hi = max(float(v.threshold or 0) * 1.5, float(np.max(v.amap)), 1e-3)
            files.append((heat_path, heat_overlay(rgb, v.amap, lo, hi)))
        for path, arr in files:
            ok, buf = cv2.imencode(".png", arr)
            if not ok:
                raise OSError(f"PNG encoding failed for {path}")
            data = buf.tobytes()
            self._make_room(len(data))
            with open(path, "wb") as f:
                f.write(data)
            self.size += len(data)
            self.written += 1

    def _make_room(self, incoming: int) -> None:
        if self.size + incoming <= self.quota:
            return
        target = int(self.quota * 0.9) - incoming
        files = sorted(self.root.rglob("*.png"), key=lambda p: (p.stat().st_mtime, p.name))
        for p in files:
            if self.size <= target:
                break
            try:
                sz = p.stat().st_size
                p.unlink()
                self.size -= sz
                self.deleted += 1
            except OSError as exc:
                log.warning("archive: cannot delete %s: %s", p, exc)
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not any(d.iterdir()):
                os.rmdir(d)

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "dropped": self.dropped,
            "deleted": self.deleted,
            "errors": self.errors,
            "bytes": self.size,
        }

"""The service core's seams without a trained model: decide, health, outbox, store, image files."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.calibfile import Calibration
from edge_app.capture.imagefile import ImageFileError, incomplete, read_frame_image
from edge_app.decide import Inspected, NotInspected, decide
from edge_app.frame import Frame
from edge_app.health import HealthLimits, Observation, assess
from edge_app.outbox import Outbox
from edge_app.store import DecisionLog, DuplicateVerdictError, StoreUnavailableError

CAL = Calibration(model_onnx_sha256="a" * 64, image_threshold=5.0, pixel_threshold=3.0, min_defect_area_px=10)


def frame(seq: int = 1, t_grab: float = 1000.0, t_mono: float = 50.0) -> Frame:
    return Frame("cam1", seq, str(seq), t_grab, image=np.zeros((8, 8), np.uint8), t_mono=t_mono)


def verdict(seq: int, kind: str = "ok"):
    outcome = Inspected(score=1.0 if kind == "ok" else 9.0, amap=np.zeros((4, 4), np.float32))
    return decide(frame(seq), outcome, CAL, "S1", "a" * 64, t_decided=1000.5)


# --- decide ------------------------------------------------------------------------------------
def test_decide_makes_every_kind_of_verdict_from_its_inputs_alone():
    amap = np.zeros((4, 4), np.float32)
    ok = decide(frame(), Inspected(4.99, amap), CAL, "S1", "sha", t_decided=1000.25)
    assert (ok.verdict, ok.reason, ok.score, ok.threshold) == ("ok", None, 4.99, 5.0)
    assert ok.latency_ms["total"] == 250.0 and ok.key == "S1/cam1/1/1"
    ng = decide(frame(), Inspected(5.0, amap), CAL, "S1", "sha", t_decided=1000.25)
    assert (ng.verdict, ng.reason) == ("ng", "score"), "score == threshold is a reject"
    region = decide(frame(), Inspected(1.0, amap, regions=[{"area_px": 30}]), CAL, "S1", "sha", 1000.25)
    assert (region.verdict, region.reason) == ("ng", "region")
    ni = decide(frame(), NotInspected("runtime_error", "boom"), CAL, "S1", "sha", 1000.25)
    assert (ni.verdict, ni.reason, ni.detail, ni.score) == ("not_inspected", "runtime_error", "boom", None)
    # decided after the deadline (monotonic clock): not_inspected/late, the score kept for the record
    late = decide(frame(t_mono=50.0), Inspected(9.0, amap), CAL, "S1", "sha", 1000.3, 200, t_mono_decided=50.3)
    assert (late.verdict, late.reason, late.score) == ("not_inspected", "late", 9.0)
    assert "decided ng" in late.detail and "300 ms > deadline 200 ms" in late.detail
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.verdict = "ng"  # a verdict is never changed after it is made
    with pytest.raises(ValueError, match="unknown not_inspected reason 'nope'"):
        NotInspected("nope")


# --- health ------------------------------------------------------------------------------------
def test_health_follows_progress_not_liveness():
    lim = HealthLimits(heartbeat_max_age_s=10, stall_s=30, restart_after_s=60, store_restart_after_s=600)
    assert assess(Observation(now=100, heartbeats={"inspect": 99}), lim).ok
    # connected, verdicts waiting, acks stopped: degraded, then the watchdog is withheld
    h = assess(Observation(now=100, backlog=5, last_delivery=65), lim)
    assert not h.ok and not h.restart and "no broker ack for 35 s" in h.reasons[0]
    assert assess(Observation(now=100, backlog=5, last_delivery=30), lim).restart
    # broker down: degraded (verdicts wait), no restart: a restart cannot bring the broker back
    h = assess(Observation(now=100, mqtt_connected=False, mqtt_error="refused", backlog=7, last_delivery=0), lim)
    assert not h.ok and not h.restart and "MQTT disconnected (refused); 7 verdict(s) wait" in h.reasons
    # a dead or stuck thread: restart at once
    assert assess(Observation(now=100, dead_threads={"inspect": "KeyError: x"}), lim).restart
    assert assess(Observation(now=100, heartbeats={"mqtt-publisher": 80}), lim).restart
    # an unwritable log: degraded; restart only past the bound and only when no verdict lives in memory alone
    full = {"store_error": "disk full", "store_error_since": 0.0}
    assert not assess(Observation(now=100, **full), lim).restart
    assert assess(Observation(now=700, **full), lim).restart
    assert not assess(Observation(now=700, undelivered_in_memory=3, **full), lim).restart
    h = assess(Observation(now=1, cameras={"c1": "reconnecting: unplugged", "c2": "connected"}), lim)
    assert h.reasons == ("camera c1: reconnecting: unplugged",) and not h.restart


# --- store + outbox ----------------------------------------------------------------------------
def test_store_errors_are_transient_or_permanent_and_a_permanent_one_blocks_nothing(tmp_path: Path):
    db = DecisionLog(tmp_path / "log.sqlite")
    box = Outbox(db)
    assert box.add(verdict(1))
    with pytest.raises(DuplicateVerdictError):
        db.insert(verdict(1))
    # the same key again (a PLC sending one trigger id twice): set aside, the next verdicts still flow
    assert not box.add(verdict(1, "ng"))
    assert [v.key for v, _ in box.rejected] == ["S1/cam1/1/1"] and "already in the log" in box.rejected[0][1]
    assert box.add(verdict(2)) and box.store_error is None
    # the disk fills (SQLite's max_page_count): transient, waits in memory, in order
    pages = db.db.execute("PRAGMA page_count").fetchone()[0]
    db.db.execute(f"PRAGMA max_page_count = {pages}")
    for seq in range(3, 60):
        box.add(verdict(seq))
    assert box.waiting() > 0 and "full" in box.store_error
    with pytest.raises(StoreUnavailableError):
        db.insert(verdict(999))
    # ... and is still handed to the publisher (memory rows come after the logged ones)
    keys = [r.key for r in box.pending(0, 1000, set())]
    assert keys == [f"S1/cam1/{s}/{s}" for s in range(1, 60)]
    box.mark_published("S1/cam1/59/59", time.time())
    box.mark_delivered("S1/cam1/59/59", time.time())
    assert box.backlog() == 58
    db.db.execute("PRAGMA max_page_count = 1073741823")
    box.flush()
    assert box.waiting() == 0 and box.store_error is None
    rows = {r.seq: r for r in db.rows()}
    assert sorted(rows) == list(range(1, 60))
    assert rows[59].delivered_at is not None and rows[59].attempts == 1, "memory delivery state reaches the log"
    assert box.backlog() == 58


def test_a_crash_between_trigger_and_verdict_leaves_the_trigger(tmp_path: Path):
    db = DecisionLog(tmp_path / "log.sqlite")
    db.record_trigger("cam1", 1, "1", 10.0)
    db.record_trigger("cam1", 2, "2", 11.0)
    db.insert(verdict(1))
    db.close()
    db = DecisionLog(tmp_path / "log.sqlite")  # "after the restart"
    assert [(t.camera_id, t.seq) for t in db.pending_triggers()] == [("cam1", 2)]
    assert db.last_seq("cam1") == 2, "the seq of a trigger without a verdict is never given to another part"


def test_image_files_must_be_complete(tmp_path: Path):
    img = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    for ext in (".jpg", ".png", ".bmp"):
        data = cv2.imencode(ext, img)[1].tobytes()
        assert incomplete(data) is None
        (tmp_path / f"whole{ext}").write_bytes(data)
        assert read_frame_image(tmp_path / f"whole{ext}").shape == (48, 64)
        (tmp_path / f"cut{ext}").write_bytes(data[: len(data) // 3])
        with pytest.raises(ImageFileError) as exc:
            read_frame_image(tmp_path / f"cut{ext}")
        assert exc.value.reason == "incomplete_image" and f"cut{ext}" in exc.value.detail
    (tmp_path / "text.png").write_bytes(b"not an image")
    with pytest.raises(ImageFileError) as exc:
        read_frame_image(tmp_path / "text.png")
    assert exc.value.reason == "grab_failed"
    with pytest.raises(ImageFileError) as exc:
        read_frame_image(tmp_path / "missing.png")
    assert exc.value.reason == "grab_failed" and "cannot read missing.png" in exc.value.detail


def test_the_verdict_table_keeps_its_schema(tmp_path: Path):
    db = DecisionLog(tmp_path / "log.sqlite")
    db.insert(verdict(1))
    cols = [r[1] for r in sqlite3.connect(tmp_path / "log.sqlite").execute("PRAGMA table_info(verdicts)")]
    assert cols[:3] == ["id", "key", "station"] and "delivered_at" in cols


def test_memory_never_drops_an_undelivered_verdict(tmp_path: Path):
    db = DecisionLog(tmp_path / "log.sqlite")
    box = Outbox(db, max_waiting=5)
    db.db.execute("PRAGMA query_only = 1")  # nothing can be written (as a read-only remount)
    for seq in range(1, 9):
        box.add(verdict(seq))
    assert box.waiting() == 8, "undelivered verdicts are kept past the cap"
    for seq in (1, 2, 3, 4):
        box.mark_delivered(f"S1/cam1/{seq}/{seq}", time.time())
    box.add(verdict(9))
    assert box.unlogged_delivered == 4 and box.waiting() == 5
    assert [r.seq for r in box.pending(0, 100, set())] == [5, 6, 7, 8, 9]

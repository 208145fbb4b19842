"""The line service end to end: real mosquitto, real pylon emulator, real ONNX Runtime, real SQLite."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_app.config import load_config
from edge_app.service import Service, StartupError
from tests.edge_app.conftest import until, write_config

BASE = "test/L1/S1"


def start_service(cfg_path: Path) -> Service:
    svc = Service(load_config(cfg_path), cfg_path)
    svc.start()
    return svc


def run_until(svc: Service, cond, timeout: float = 30.0) -> bool:
    return until(cond, timeout)


def folder_camera(path: Path, **kw) -> dict:
    return {"id": "cam1", "type": "folder", "path": str(path), **kw}


def test_every_frame_gives_one_verdict_on_the_broker(tmp_path, broker, listener_factory, calibrated, part_images):
    (tmp_path / "imgs").mkdir()
    for p in sorted(part_images.iterdir()):
        shutil.copy(p, tmp_path / "imgs" / p.name)
    (tmp_path / "imgs" / "005_corrupt.png").write_bytes(b"\x89PNG broken")  # a failed grab
    # half-written files (a camera's FTP upload caught mid-way) and a 16-bit image
    import cv2
    import numpy as np

    part = cv2.imread(str(sorted(part_images.iterdir())[1]), cv2.IMREAD_GRAYSCALE)
    jpg = cv2.imencode(".jpg", part)[1].tobytes()
    png = cv2.imencode(".png", part)[1].tobytes()
    (tmp_path / "imgs" / "007_cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    (tmp_path / "imgs" / "009_cut.png").write_bytes(png[: len(png) // 2])
    cv2.imwrite(str(tmp_path / "imgs" / "011_deep.png"), part.astype(np.uint16) * 257)
    n = len(list((tmp_path / "imgs").iterdir()))
    lst = listener_factory(broker, f"{BASE}/#")
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(tmp_path / "imgs")])
    svc = start_service(cfg)
    try:
        results = lst.wait_for("/result", n)
        assert len(results) == n
        assert [r["part_id"] for r in results] == [str(i) for i in range(1, n + 1)]
        bad = {r["part_id"]: r for r in results if r["verdict"] == "not_inspected"}
        reasons = sorted((r["reason"], r["detail"].split(":")[0].split(" (")[0]) for r in bad.values())
        assert reasons == [
            ("grab_failed", "cannot decode 005_corrupt.png"),
            ("incomplete_image", "007_cut.jpg"),
            ("incomplete_image", "009_cut.png"),
            ("unsupported_image", "a uint16 image"),
        ], reasons
        assert any("end-of-image marker" in r["detail"] for r in bad.values())
        # defective parts are found, good ones pass
        by_name = {r["detail"]: r for r in results if r["verdict"] != "not_inspected"}
        assert sum(by_name[k]["verdict"] == "ng" for k in by_name if "good" not in k) >= 3
        assert all(by_name[k]["verdict"] == "ok" for k in by_name if "good" in k)
        for r in results:
            assert r["schema_version"] == 1
            assert r["idempotency_key"] == f"S1/cam1/{r['part_id']}/{r['seq']}"
            assert r["late"] is False
        assert run_until(svc, lambda: svc.outbox.backlog() == 0)
        # status: retained online message with model and calibration ids
        status = lst.wait_for("/status", 1)[-1]
        assert status["state"] == "online" and status["model_sha256"] == svc.runtime.model_sha256
        assert status["calibration_id"] == calibrated["cal"].id
        # the stats message and the metrics endpoint
        assert lst.wait_for("/stats", 1, timeout=5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_server.port}/metrics", timeout=5).read().decode()
        assert 'lineinspect_verdicts_total{verdict="not_inspected"} 4' in text
        assert 'lineinspect_not_inspected_total{reason="grab_failed"} 1' in text
        assert 'lineinspect_not_inspected_total{reason="incomplete_image"} 2' in text
        assert "lineinspect_stage_latency_ms_bucket" in text and "lineinspect_mqtt_connected 1" in text
        # NG images and heatmaps archived
        assert run_until(svc, lambda: svc.archive.written >= 2, 10)
        assert list((tmp_path / "archive").rglob("*_heat.png"))
    finally:
        svc.shutdown()
    # the log holds every verdict, all delivered
    import sqlite3

    db = sqlite3.connect(tmp_path / "log.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(delivered_at) FROM verdicts").fetchone() == (n, n)
    # offline status retained after a clean stop
    assert lst.wait_for("/status", 2)[-1]["state"] == "offline"


def test_pylon_emulator_software_trigger_with_part_ids(tmp_path, broker, listener_factory, calibrated, part_images):
    imgs = tmp_path / "emu"
    imgs.mkdir()
    for p in sorted(part_images.iterdir())[:4]:
        shutil.copy(p, imgs / p.name)
    (imgs / "002b_broken.png").write_bytes(b"not an image")  # the emulator fails this grab
    cam = {
        "id": "pylon1",
        "type": "pylon",
        "serial": "0815-0001",
        "trigger": {"mode": "software"},
        "emulator_image_dir": str(imgs),
        "pixel_format": "Mono8",
        "buffer_count": 4,
        "grab_timeout_ms": 2000,
    }
    lst = listener_factory(broker, f"{BASE}/#")
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam])
    svc = start_service(cfg)
    try:
        assert run_until(svc, lambda: svc.cam_states.get("pylon1") == "connected", 20)
        assert svc.publisher.commands_ready.wait(10), "the broker never acknowledged the cmd/+ subscription"
        parts = [f"P-{i:03d}" for i in range(7)]
        for pid in parts:
            lst.publish(f"{BASE}/cmd/trigger", {"part_id": pid})
        results = lst.wait_for("/result", len(parts))
        assert [r["part_id"] for r in results] == parts
        verdicts = [r["verdict"] for r in results]
        # the 5 files cycle: the broken one fails, the line goes on (recovery) with the next image
        # 5 files cycle over 7 triggers: the broken one fails once or twice, and the next grab recovers
        assert verdicts.count("not_inspected") in (1, 2)
        i = verdicts.index("not_inspected")
        assert results[i]["reason"] == "grab_failed" and "Failed to load image" in results[i]["detail"]
        assert verdicts[(i + 1) % len(parts)] in ("ok", "ng")
        replies = lst.wait_for("/cmd_result", len(parts))
        assert all(r["ok"] for r in replies)
        # a command with a bad payload gets a clear refusal
        lst.publish(f"{BASE}/cmd/trigger", "[1, 2]")
        assert run_until(svc, lambda: any(not r["ok"] for r in lst.on("/cmd_result")), 10)
        assert "JSON object" in next(r for r in lst.on("/cmd_result") if not r["ok"])["error"]
    finally:
        svc.shutdown()


def test_pylon_camera_that_is_not_there_reconnects_with_status(tmp_path, broker, listener_factory, calibrated):
    cam = {"id": "gone", "type": "pylon", "serial": "no-such-serial", "reconnect": {"initial_ms": 50, "max_ms": 200}}
    lst = listener_factory(broker, f"{BASE}/status")
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam])
    svc = start_service(cfg)
    try:
        assert run_until(svc, lambda: svc.metrics.get("camera_reconnects_total", camera="gone") >= 3, 10)
        status = lst.wait_for("/status", 2)[-1]
        assert "reconnecting" in status["cameras"]["gone"] and "no-such-serial" in status["cameras"]["gone"]
    finally:
        svc.shutdown()


def test_broker_outage_loses_nothing_and_keeps_order(tmp_path, broker, listener_factory, calibrated, part_images):
    lst = listener_factory(broker, f"{BASE}/result")
    cam = folder_camera(part_images, rate_hz=20, loop=True)
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam], mqtt={"late_after_s": 0.5})
    svc = start_service(cfg)
    try:
        assert len(lst.wait_for("/result", 5)) >= 5
        assert svc.publisher.commands_ready.is_set()
        broker.stop()  # broker down mid-run: verdicts pile up in the outbox
        assert run_until(svc, lambda: svc.outbox.backlog() >= 10, 20)
        assert not svc.publisher.commands_ready.is_set(), "no commands can arrive while the broker is down"
        broker.start()
        assert svc.publisher.commands_ready.wait(15), "the cmd/+ subscription is renewed after the reconnect"
        time.sleep(1.0)
    finally:
        svc.stop_capture.set()
        svc.shutdown(drain_timeout_s=20)
    rows = (
        __import__("sqlite3")
        .connect(tmp_path / "log.sqlite")
        .execute("SELECT key, delivered_at FROM verdicts ORDER BY id")
        .fetchall()
    )
    assert all(d is not None for _, d in rows), "every verdict acknowledged after the outage"
    got = lst.wait_for("/result", len(rows), timeout=20)
    keys = [m["idempotency_key"] for m in got]
    dedup = list(dict.fromkeys(keys))
    assert dedup == [k for k, _ in rows], "every verdict arrives, in order, once per idempotency key"
    assert any(m["late"] for m in got), "the backlog is flagged late"


def test_restart_delivers_the_backlog(tmp_path, broker_factory, listener_factory, calibrated, part_images):
    broker = broker_factory()
    broker.stop()  # the broker is down for the whole first run
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(part_images)])
    svc = start_service(cfg)
    assert run_until(svc, lambda: sum(svc.counts.values()) == 12, 30)
    svc.shutdown(drain_timeout_s=0.5)
    import sqlite3

    db = sqlite3.connect(tmp_path / "log.sqlite")
    assert db.execute("SELECT COUNT(*) FROM verdicts WHERE delivered_at IS NULL").fetchone()[0] == 12
    broker.start()
    lst = listener_factory(broker, f"{BASE}/result")
    empty = tmp_path / "empty_cam"
    empty.mkdir()
    shutil.copy(sorted(part_images.iterdir())[0], empty / "x.png")
    cfg2 = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(empty)])
    svc2 = start_service(cfg2)
    try:
        got = lst.wait_for("/result", 13)
        assert len({m["idempotency_key"] for m in got}) == 13
        old = [m for m in got if m["seq"] <= 12]
        assert len(old) == 12 and all(m["late"] for m in old)
        new = [m for m in got if m["seq"] == 13]
        assert new, "sequence numbers continue after the restart (keys stay unique)"
    finally:
        svc2.shutdown()


def test_wrong_password_gives_a_clear_error_and_status(tmp_path, broker_factory, calibrated, part_images, caplog):
    broker = broker_factory(password=("line", "right-secret"))
    (tmp_path / "pw").write_text("wrong-secret\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(part_images)],
        mqtt={"username": "line", "password_file": str(tmp_path / "pw")},
    )
    svc = start_service(cfg)
    try:
        assert run_until(svc, lambda: svc.publisher.last_error is not None, 15)
        assert "refused" in svc.publisher.last_error and svc.publisher.auth_failed
        assert "check mqtt.username and the password file" in caplog.text
        # the line keeps inspecting; verdicts wait in the outbox
        assert run_until(svc, lambda: svc.outbox.backlog() == 12, 20)
        assert svc.metrics.get("mqtt_connect_failures_total", reason=svc.publisher.last_error.split(": ", 1)[1]) >= 1
    finally:
        svc.shutdown(drain_timeout_s=0.2)


def test_tls_and_password(tmp_path, broker_factory, listener_factory, calibrated, part_images):
    broker = broker_factory(password=("line", "s3cret"), tls=True)
    lst = listener_factory(broker, f"{BASE}/result", auth=("line", "s3cret"))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret")
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)  # as systemd's LoadCredential= provides it
    try:
        cfg = write_config(
            tmp_path / "c.yaml",
            calibrated,
            broker,
            tmp_path,
            [folder_camera(part_images)],
            mqtt={"username": "line", "password_credential": "mqtt-password", "tls": {"ca_file": str(broker.ca)}},
        )
        svc = start_service(cfg)
        try:
            assert len(lst.wait_for("/result", 12)) == 12
        finally:
            svc.shutdown()
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]


def test_queue_overrun_and_deadline_become_not_inspected(tmp_path, broker, listener_factory, calibrated, part_images):
    lst = listener_factory(broker, f"{BASE}/result")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(60):
        shutil.copy(sorted(part_images.iterdir())[i % 12], many / f"{i:03d}.png")
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(many, rate_hz=1000)],
        decision={"queue_size": 1, "deadline_ms": 40},
    )
    svc = start_service(cfg)
    try:
        got = lst.wait_for("/result", 60)
        assert len(got) == 60, "every frame still gets exactly one verdict"
        assert sorted(int(m["part_id"]) for m in got) == list(range(1, 61))
        reasons = {m["reason"] for m in got if m["verdict"] == "not_inspected"}
        assert "queue_overrun" in reasons
    finally:
        svc.shutdown()


def test_calibration_for_another_model_is_refused(tmp_path, broker, calibrated, part_images):
    import yaml

    other = yaml.safe_load(Path(calibrated["calibration"]).read_text())
    other["model_onnx_sha256"] = "a" * 64
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(part_images)],
        calibration={"file": str(tmp_path / "other.yaml")},
    )
    with pytest.raises(StartupError, match="recalibrate"):
        Service(load_config(cfg), cfg)
    # at run time, a reload with a foreign file keeps the current calibration
    good_cfg = write_config(
        tmp_path / "g.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(part_images)],
        calibration={"file": str(tmp_path / "live.yaml")},
    )
    shutil.copy(calibrated["calibration"], tmp_path / "live.yaml")
    svc = start_service(good_cfg)
    try:
        before = svc.inspector.calibration.id
        shutil.copy(tmp_path / "other.yaml", tmp_path / "live.yaml")
        res = svc.command("reload_calibration", {})
        assert (not res["ok"] and "another model" not in res["error"]) or "recalibrate" in res["error"]
        assert svc.inspector.calibration.id == before
    finally:
        svc.shutdown()


def test_pause_resume_and_part_id_commands(tmp_path, broker, listener_factory, calibrated, part_images):
    lst = listener_factory(broker, f"{BASE}/#")
    cam = folder_camera(part_images, rate_hz=10, part_id={"source": "mqtt", "mqtt_wait_ms": 2000, "prefix": "A-"})
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam])
    svc = start_service(cfg)
    try:
        # commands are not retained: one sent before the broker acknowledged our subscription is gone
        assert svc.publisher.commands_ready.wait(10), "the broker never acknowledged the cmd/+ subscription"
        lst.publish(f"{BASE}/cmd/pause", {})
        assert run_until(svc, svc.paused.is_set, 5)
        for i in range(3):
            lst.publish(f"{BASE}/cmd/part_id", {"part_id": f"X{i}"})
        got = lst.wait_for("/result", 3)
        assert [m["part_id"] for m in got[:3]] == ["A-X0", "A-X1", "A-X2"]
        assert all(m["verdict"] == "not_inspected" and m["reason"] == "paused" for m in got[:3])
        lst.publish(f"{BASE}/cmd/resume", {})
        lst.publish(f"{BASE}/cmd/part_id", {"part_id": "Y"})
        got = lst.wait_for("/result", 4)
        assert got[3]["part_id"] == "A-Y" and got[3]["verdict"] in ("ok", "ng")
    finally:
        svc.shutdown()


def test_store_full_keeps_verdicts_in_memory_then_flushes(tmp_path, broker, listener_factory, calibrated, part_images):
    lst = listener_factory(broker, f"{BASE}/result")
    cam = folder_camera(part_images, rate_hz=20, loop=True)
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam])
    svc = start_service(cfg)
    try:
        assert len(lst.wait_for("/result", 2)) >= 2
        # SQLite's own "database or disk is full" (SQLITE_FULL): cap the file at its current size
        pages = svc.db.db.execute("PRAGMA page_count").fetchone()[0]
        svc.db.db.execute(f"PRAGMA max_page_count = {pages}")
        assert run_until(svc, lambda: svc.outbox.waiting() >= 3, 60), "the log never filled up"
        assert svc.metrics.get("store_errors_total") >= 3
        svc.db.db.execute("PRAGMA max_page_count = 1073741823")  # the disk has room again
        assert run_until(svc, lambda: not svc.outbox.waiting(), 30)
        svc.stop_capture.set()
    finally:
        svc.shutdown()
    import sqlite3

    seqs = [r[0] for r in sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT seq FROM verdicts ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1)), "no verdict lost while the disk was full"
    got = {m["seq"] for m in lst.wait_for("/result", len(seqs))}
    assert got == set(seqs)


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.5)
    return s, path


def test_systemd_process_ready_watchdog_and_sigterm_drain(tmp_path, broker, listener_factory, calibrated, part_images):
    """``lineinspect run`` as systemd starts it: NOTIFY_SOCKET datagrams, SIGTERM drains and exits 0."""
    lst = listener_factory(broker, f"{BASE}/#")
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(part_images, rate_hz=4)],
        metrics={"enabled": False},
    )
    sock, path = _notify_socket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1500000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_app.cli", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    datagrams: list[str] = []
    try:
        end = time.monotonic() + 120

        def seen_all() -> bool:
            return any("WATCHDOG=1" in d for d in datagrams) and any("verdicts" in d for d in datagrams)

        while time.monotonic() < end and not seen_all():
            try:
                datagrams.append(sock.recv(4096).decode())
            except TimeoutError:
                assert proc.poll() is None, proc.stderr.read().decode()
        assert any(d.startswith("READY=1") for d in datagrams)
        assert any("WATCHDOG=1" in d for d in datagrams)
        assert any(d.startswith("STATUS=") and "verdicts" in d for d in datagrams)
        assert len(lst.wait_for("/result", 2)) >= 2
        proc.send_signal(signal.SIGHUP)  # systemctl reload: re-read the calibration
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read().decode()
        assert "calibration reloaded" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    import sqlite3

    n, delivered = (
        sqlite3.connect(tmp_path / "log.sqlite")
        .execute("SELECT COUNT(*), COUNT(delivered_at) FROM verdicts")
        .fetchone()
    )
    assert n == delivered and n >= 2, "in-flight verdicts were published before exit"
    assert len(lst.on("/result")) >= n
    assert lst.on("/status")[-1]["state"] == "offline"
    json.dumps(datagrams)


def test_calibration_scored_with_other_arithmetic_is_used_with_a_warning(
    tmp_path, broker, calibrated, part_images, caplog
):
    """Same model, other backend/precision (e.g. bf16): accepted (the model matches) but named in the log."""
    import yaml

    cal = yaml.safe_load(Path(calibrated["calibration"]).read_text())
    for name, samples, warned in [
        ("bf16.yaml", {"backend": "openvino", "device": "cpu (bf16)"}, True),
        ("same.yaml", {"backend": "onnxruntime", "device": "cpu"}, False),
    ]:
        cal["samples"] = {**cal["samples"], **samples}
        (tmp_path / name).write_text(yaml.safe_dump(cal))
        cfg = write_config(
            tmp_path / "c.yaml",
            calibrated,
            broker,
            tmp_path,
            [folder_camera(part_images)],
            calibration={"file": str(tmp_path / name)},
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge_app.service"):
            svc = Service(load_config(cfg), cfg)
        try:
            assert svc.inspector.calibration.image_threshold == cal["thresholds"]["image_score"]
            messages = [r.getMessage() for r in caplog.records if "recalibrate with the station's" in r.getMessage()]
            assert bool(messages) is warned, messages
            if warned:
                assert "openvino on cpu (bf16)" in messages[0] and "onnxruntime on cpu" in messages[0]
        finally:
            svc.shutdown()

"""Faults injected into the real parts: a disk that fills, SIGKILL with frames queued, a broker that
dies or freezes, a thread that dies. Each checks the line rules (one verdict per trigger, none lost,
no stale copy marked fresh) and that every health signal says what really happens."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_app.config import load_config
from edge_app.service import Service
from tests.edge_app.conftest import until, write_config
from tests.edge_app.test_service import BASE, folder_camera, run_until, start_service

ROOT = Path(__file__).parents[2]


def metrics_text(svc: Service) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_server.port}/metrics", timeout=5).read().decode()


def log_rows(db: Path) -> list[tuple]:
    return (
        sqlite3.connect(db).execute("SELECT seq, verdict, reason, delivered_at FROM verdicts ORDER BY seq").fetchall()
    )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_keeps_verdicts_flowing_says_so_and_recovers(
    tmp_path, small_disk, broker, listener_factory, calibrated, part_images
):
    lst = listener_factory(broker, f"{BASE}/#")
    cam = folder_camera(part_images, rate_hz=25, loop=True)
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [cam],
        storage={"database": str(small_disk / "log.sqlite"), "archive_dir": str(small_disk / "archive")},
    )
    svc = start_service(cfg)
    try:
        # the archive's NG images fill the 1 MiB disk; the log cannot grow any more
        assert run_until(svc, lambda: svc.outbox.store_error is not None, 60), "the disk never filled"
        assert run_until(svc, lambda: svc.outbox.waiting() >= 10, 30)
        n_full = sum(svc.counts.values())
        # the broker is up: verdicts waiting for the disk are published all the same
        assert run_until(svc, lambda: max((m["seq"] for m in lst.on("/result")), default=0) >= n_full, 20)
        assert run_until(svc, lambda: not svc.health.ok, 5)
        reasons = " ".join(svc.health.reasons)
        assert "decision log not writable" in reasons and not svc.health.restart
        assert run_until(svc, lambda: lst.on("/status")[-1]["state"] == "degraded", 5), "the retained status says so"
        assert lst.on("/status")[-1]["reasons"]
        text = metrics_text(svc)
        assert "lineinspect_health_degraded 1" in text and "lineinspect_store_errors_total" in text
        assert 'lineinspect_health_reason{reason="decision log not writable' in text
        # the disk is grown (1 -> 64 MiB): everything reaches the log, delivery states included, and
        # the service is healthy again without a restart
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        assert run_until(svc, lambda: svc.outbox.waiting() == 0 and svc.outbox.store_error is None, 60)
        assert run_until(svc, lambda: svc.health.ok, 10), svc.health.reasons
        assert run_until(svc, lambda: lst.on("/status")[-1]["state"] == "online", 5)
        svc.stop_capture.set()
    finally:
        svc.shutdown(drain_timeout_s=20)
    rows = log_rows(small_disk / "log.sqlite")
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "no verdict lost, none twice, while the disk was full"
    assert all(r[3] is not None for r in rows), "every verdict acknowledged and marked so in the log"
    got = lst.wait_for("/result", len(rows))
    assert {m["seq"] for m in got} == set(seqs)


def test_sigkill_with_frames_queued_loses_no_trigger_and_reuses_no_seq(
    tmp_path, broker, listener_factory, calibrated, part_images
):
    """A folder replay paced by the line keeps the queue full; SIGKILL the real service process."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(300):
        src = sorted(part_images.iterdir())[i % 12]
        shutil.copy(src, many / f"{i:04d}_{src.name}")
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [folder_camera(many)],  # rate_hz None: as fast as the line takes them, the queue stays full
        decision={"queue_size": 16},
        metrics={"enabled": False},
    )
    status = listener_factory(broker, f"{BASE}/status", client_id="test-status")
    proc = subprocess.Popen([sys.executable, "-m", "edge_app.cli", "run", "--config", str(cfg)], cwd=ROOT)
    db = tmp_path / "log.sqlite"
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if sqlite3.connect(db).execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] >= 40:
                    break
            except sqlite3.OperationalError:
                pass  # the table is not there yet
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the broker sends the last will at once: it says what happened and carries no made-up time
    assert until(lambda: status.on("/status") and status.on("/status")[-1]["state"] == "offline", 10)
    will = status.on("/status")[-1]
    assert "t" not in will and "last will" in will["reason"] and will["t_connected"] > 0
    con = sqlite3.connect(db)
    orphans = [r[0] for r in con.execute("SELECT seq FROM triggers ORDER BY seq")]
    logged = [r[0] for r in con.execute("SELECT seq FROM verdicts ORDER BY seq")]
    con.close()
    assert len(orphans) >= 5, "frames were queued at the kill"
    assert sorted(orphans + logged) == list(range(1, max(orphans + logged) + 1)), "every grabbed trigger is on disk"
    # restart: each trigger without a verdict gets not_inspected/service_restart, in order, published
    lst = listener_factory(broker, f"{BASE}/result")
    rest = tmp_path / "rest"
    rest.mkdir()
    for p in sorted(part_images.iterdir())[:3]:
        shutil.copy(p, rest / p.name)
    cfg2 = write_config(tmp_path / "c2.yaml", calibrated, broker, tmp_path, [folder_camera(rest)])
    svc = start_service(cfg2)
    try:
        top = max(orphans + logged)
        assert run_until(
            svc,
            lambda: svc.counts["not_inspected"] >= len(orphans) and sum(svc.counts.values()) >= len(orphans) + 3,
            30,
        )
        # the first run's unacknowledged backlog arrives too: wait for the three new parts themselves
        assert until(lambda: {top + 1, top + 2, top + 3} <= {m["seq"] for m in lst.on("/result")}, 30)
        got = lst.on("/result")
        restarted = [m for m in got if m["reason"] == "service_restart"]
        assert [m["seq"] for m in restarted] == orphans
        assert all(m["verdict"] == "not_inspected" and m["late"] for m in restarted)
        assert "stopped before deciding" in restarted[0]["detail"]
        new = sorted({m["seq"] for m in got if m["seq"] > top})
        assert new == [top + 1, top + 2, top + 3], "new parts continue after the last seq ever used"
        assert svc.recovered == len(orphans)
    finally:
        svc.shutdown()
    rows = log_rows(db)
    assert [r[0] for r in rows] == list(range(1, top + 4)), "exactly one verdict per trigger across the crash"
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM triggers").fetchone()[0] == 0


def test_after_an_outage_no_copy_is_marked_fresh(tmp_path, broker, listener_factory, calibrated, part_images):
    """The lateness rule: every copy's late flag is decided when it is handed over; a verdict decided
    while the broker was down, or handed to an earlier connection, is never sent as late: false."""
    late_after = 3.0
    lst = listener_factory(broker, f"{BASE}/result")
    cam = folder_camera(part_images, rate_hz=20, loop=True)
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [cam], mqtt={"late_after_s": late_after})
    svc = start_service(cfg)
    try:
        assert len(lst.wait_for("/result", 10, 10)) >= 10
        broker.stop()  # copies in flight die with the connection (the broker keeps the PLC's session)
        t_down = time.time()  # the broker process has exited: nothing decided from now on can be on time
        assert run_until(svc, lambda: svc.outbox.backlog() >= 20, 20)
        broker.start()
        assert run_until(svc, lambda: svc.publisher.connected, 20)
        t_up = svc.publisher.connected_since
        time.sleep(1.0)
        svc.stop_capture.set()
    finally:
        svc.shutdown(drain_timeout_s=20)
    rows = sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT key, t_decided FROM verdicts").fetchall()
    got = lst.wait_for("/result", len(rows), 20)
    assert {m["idempotency_key"] for m in got} == {k for k, _ in rows}, "nothing lost"
    during = [m for m in got if t_down <= m["t_decided"] < t_up]
    assert len(during) >= 20
    assert all(m["late"] for m in during), "verdicts decided during the outage are all flagged late"
    first = {}
    for m in got:
        first.setdefault(m["idempotency_key"], m)  # a PLC deduplicating by key keeps the first copy
    stale = [m for m in first.values() if not m["late"] and m["t_decided"] < t_up and m["t_decided"] >= t_down]
    assert stale == []


def test_a_frozen_broker_makes_delivery_stuck_degraded_then_withholds_the_watchdog(
    tmp_path, broker, listener_factory, calibrated, part_images
):
    """SIGSTOP the broker: the TCP connection stays up, acks stop. Health must see it."""
    cam = folder_camera(part_images, rate_hz=10, loop=True)
    cfg = write_config(
        tmp_path / "c.yaml",
        calibrated,
        broker,
        tmp_path,
        [cam],
        health={"stall_s": 1.5, "restart_after_s": 3.0},
        mqtt={"keepalive_s": 60},
    )
    svc = start_service(cfg)
    try:
        assert run_until(svc, lambda: svc.metrics.get("verdicts_delivered_total") >= 5, 20)
        assert svc.health.ok
        broker.proc.send_signal(signal.SIGSTOP)
        assert run_until(svc, lambda: any("delivery stuck" in r for r in svc.health.reasons), 15)
        assert svc.publisher.connected, "the connection still looks up: liveness alone would say healthy"
        # no copies pile up in a connection that does not ack (they would arrive stale, marked fresh):
        # at 10 parts/s only those handed in the first 0.5 s of the stall are in flight
        assert run_until(svc, lambda: svc.outbox.backlog() >= 25, 10)
        assert len(svc.publisher.inflight) <= 8, len(svc.publisher.inflight)
        assert run_until(svc, lambda: svc.health.restart, 10), "past restart_after_s the watchdog is withheld"
        assert "lineinspect_watchdog_withheld 1" in metrics_text(svc)
        broker.proc.send_signal(signal.SIGCONT)
        assert run_until(svc, lambda: svc.health.ok, 20), svc.health.reasons
        assert "lineinspect_watchdog_withheld 0" in metrics_text(svc)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        svc.shutdown()


def test_a_thread_that_dies_is_logged_counted_and_restarts_the_service(
    tmp_path, broker, listener_factory, calibrated, part_images, caplog, monkeypatch
):
    lst = listener_factory(broker, f"{BASE}/status")
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(part_images, rate_hz=10)])
    svc = Service(load_config(cfg), cfg)

    def broken(*a, **kw):
        raise KeyError("a bug in inspection")

    monkeypatch.setattr(svc.inspector, "decide", broken)
    with caplog.at_level(logging.ERROR):
        svc.start()
        try:
            assert run_until(svc, lambda: svc.health.restart, 15)
            assert "thread inspect died: KeyError: 'a bug in inspection'" in svc.health.reasons
            assert svc.metrics.get("thread_errors_total", thread="inspect") == 1
            assert run_until(svc, lambda: lst.on("/status") and lst.on("/status")[-1]["state"] == "degraded", 10)
        finally:
            svc.stop_capture.set()
            svc.shutdown(drain_timeout_s=1)
    assert any("thread inspect died" in r.getMessage() for r in caplog.records)
    # the frame it died on is still on disk: the restart gives it its verdict
    assert sqlite3.connect(tmp_path / "log.sqlite").execute("SELECT COUNT(*) FROM triggers").fetchone()[0] >= 1


def test_small_truths(tmp_path, broker, listener_factory, calibrated, part_images, caplog):
    """Zero counters and a never-opened camera on /metrics, an honest will, a quiet clean stop,
    a clear answer to a command that is not JSON."""
    lst = listener_factory(broker, f"{BASE}/#")
    gone = {"id": "gone", "type": "pylon", "serial": "no-such-serial", "reconnect": {"initial_ms": 50, "max_ms": 200}}
    cfg = write_config(tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(part_images), gone])
    svc = start_service(cfg)
    try:
        text = metrics_text(svc)
        for line in (
            'lineinspect_camera_connected{camera="gone"} 0',
            "lineinspect_store_errors_total 0",
            'lineinspect_verdicts_total{verdict="ng"}',
            "lineinspect_verdicts_delivered_total",
        ):
            assert line in text, line
        assert svc.publisher.commands_ready.wait(10)
        lst.publish(f"{BASE}/cmd/pause", "pause please")
        reply = lst.wait_for("/cmd_result", 1, 10)[-1]
        assert reply["ok"] is False and "not JSON" in reply["error"] and "{}" in reply["error"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge_app.publish"):
            svc.stop_capture.set()
            svc.shutdown()
        assert not [r for r in caplog.records if "MQTT disconnected" in r.getMessage()], "a clean stop is no warning"
        assert until(lambda: lst.on("/status")[-1]["state"] == "offline", 5)  # stop waits for its PUBACK
        assert lst.on("/status")[-1]["reason"] == "stopped"
    finally:
        if svc.publisher.thread.is_alive():
            svc.shutdown()
    doubled = [r.getMessage() for r in caplog.records if "[gone] [gone]" in r.getMessage()]
    assert not doubled


def test_a_part_that_fails_to_open_closes_the_parts_opened_before_it(tmp_path, broker, calibrated, part_images):
    import socket

    from edge_app.service import StartupError

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cfg = write_config(
        tmp_path / "c.yaml", calibrated, broker, tmp_path, [folder_camera(part_images)], metrics={"port": port}
    )

    db = str(tmp_path / "log.sqlite")

    def open_log_fds() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if str(fd.resolve(strict=False)).startswith(db))

    try:
        with pytest.raises(StartupError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            Service(load_config(cfg), cfg)
        assert open_log_fds() == 0, "the decision log opened before the metrics server was closed again"
    finally:
        busy.close()

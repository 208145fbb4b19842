"""Fault scenarios against the real parts, one table: does every trigger get exactly one verdict, is
anything lost or reused, is a stale copy ever marked fresh, how long until it recovers.

    python benchmarks/faults.py [--scenarios broker_outage sigkill_queued disk_full broker_frozen
                                 truncated_images restart_backlog] [--seconds 8]

Real mosquitto (the tests' broker helper, on a free loopback port), a folder camera, ONNX Runtime
on a tiny synthetic bundle trained here (cached under runs/faults), SQLite. A PLC stand-in
subscribes with a persistent session and stamps each copy with its arrival time.

Columns: triggers (sequence numbers used), stored (verdict rows in the log), delivered (rows
acknowledged), distinct_keys (idempotency keys the PLC received), lost (triggers without a verdict
at the PLC), duplicates (extra copies the PLC dropped by key), seq_reused (a seq given to two
parts), stale_marked_fresh (first copy of a key, late: false, that arrived more than late_after_s
+ 1 s after its decision, or that was decided while the broker was down), recover_s (fault
cleared -> backlog 0 and health ok, without a restart). Writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402

LATE_AFTER_S = 3.0


class Plc:
    """A persistent-session subscriber that records (arrival time, payload) of every result copy."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.copies: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-plc", clean_session=False)
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(topic, qos=1), ready.set())
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 0.5)
        c.connect_async("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c
        if not ready.wait(10):
            msg = "the PLC stand-in could not connect to the broker"
            raise RuntimeError(msg)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.copies.append((time.time(), json.loads(msg.payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _until(cond, timeout: float) -> bool:
    from tests.edge_app.conftest import until

    return until(cond, timeout)


def _fixtures(work: Path) -> tuple[dict, Path]:
    """Tiny exported bundle + calibration + 12 part images (trained once, cached)."""
    from engines.synthetic import make_dataset
    from tests.edge_app.conftest import make_calibration, make_part_images

    data = work / "parts-data"
    bundle = work / "bundle"
    if not (bundle / "model.onnx").is_file():
        from engines.export import export_bundle
        from engines.train import TrainConfig, train

        make_dataset(data, n_train=40, n_test_good=10, n_test_per_defect=5, size=128)
        train(data, bundle, TrainConfig(image_size=128, epochs=6, seed=0, num_threads=2, device="cpu"), quiet=True)
        export_bundle(bundle)
    (work / "cal").mkdir(exist_ok=True)
    (work / "parts").mkdir(exist_ok=True)
    return make_calibration(bundle, data, work / "cal"), make_part_images(data, work / "parts")


class Scenario:
    def __init__(self, name: str, base: Path, calibrated: dict, parts: Path, seconds: float):
        from tests.edge_app.conftest import Broker

        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.calibrated = calibrated
        self.parts = parts
        self.seconds = seconds
        self.broker = Broker(self.dir / "broker").start()
        self.plc = Plc(self.broker.port, "bench/L1/S1/result")
        self.db = self.dir / "log.sqlite"
        self.down: list[tuple[float, float]] = []  # broker outages (start, end) in time.time()
        self.recover_s: float | None = None

    def config(self, cameras: list[dict], name: str = "c.yaml", **sections) -> Path:
        from tests.edge_app.conftest import write_config

        sections.setdefault("mqtt", {})
        sections["mqtt"] = {"topic_prefix": "bench", "late_after_s": LATE_AFTER_S, **sections["mqtt"]}
        return write_config(self.dir / name, self.calibrated, self.broker, self.dir, cameras, **sections)

    def camera(self, path: Path | None = None, **kw) -> dict:
        return {"id": "cam1", "type": "folder", "path": str(path or self.parts), **kw}

    def service(self, cfg: Path):
        from edge_app.config import load_config
        from edge_app.service import Service

        svc = Service(load_config(cfg), cfg)
        svc.start()
        return svc

    def recovered(self, svc, t_clear: float, timeout: float = 60) -> None:
        """Time from the fault clearing until everything is acknowledged and health is ok."""
        from edge_app.health import assess

        def clear() -> bool:
            return svc.outbox.backlog() == 0 and svc.outbox.waiting() == 0 and assess(svc.observe(), svc.limits).ok

        if _until(clear, timeout):
            self.recover_s = round(time.monotonic() - t_clear, 2)

    def restart_with(self, n_parts: int) -> None:
        """Start the service again on the same log, with ``n_parts`` new parts; time its recovery."""
        rest = self.dir / "rest"
        rest.mkdir()
        for p in sorted(self.parts.iterdir())[:n_parts]:
            shutil.copy(p, rest / p.name)
        t_clear = time.monotonic()
        svc = self.service(self.config([self.camera(rest)], name="c2.yaml"))
        try:
            self.recovered(svc, t_clear)
        finally:
            svc.shutdown(drain_timeout_s=20)

    def broker_down(self, sig: int = signal.SIGTERM) -> float:
        self.broker.stop(sig)
        return time.time()

    def broker_up(self, t_down: float) -> None:
        self.broker.start()
        self.down.append((t_down, time.time()))

    def row(self) -> dict:
        con = sqlite3.connect(self.db)
        rows = con.execute("SELECT key, seq, part_id, delivered_at, t_decided FROM verdicts").fetchall()
        pending = con.execute("SELECT seq FROM triggers").fetchall()
        con.close()
        _until(lambda: len({m["idempotency_key"] for _, m in self.plc.copies}) >= len(rows), 20)
        with self.plc.lock:
            copies = list(self.plc.copies)
        seqs = [r[1] for r in rows] + [p[0] for p in pending]
        triggers = max(seqs, default=0)
        keys = {m["idempotency_key"] for _, m in copies}
        first: dict[str, tuple[float, dict]] = {}
        for t, m in copies:
            first.setdefault(m["idempotency_key"], (t, m))

        def stale(t: float, m: dict) -> bool:
            if m["late"]:
                return False
            during_outage = any(a <= m["t_decided"] < b for a, b in self.down)
            return during_outage or t - m["t_decided"] > LATE_AFTER_S + 1.0

        by_seq: dict[int, set[str]] = {}
        for _, m in copies:
            by_seq.setdefault(m["seq"], set()).add(m["part_id"])
        return {
            "scenario": self.name,
            "triggers": triggers,
            "stored": len(rows),
            "delivered": sum(1 for r in rows if r[3] is not None),
            "distinct_keys": len(keys),
            "lost": triggers - len({m["seq"] for _, m in copies}),
            "duplicates": len(copies) - len(keys),
            "seq_reused": sum(1 for parts in by_seq.values() if len(parts) > 1),
            "stale_marked_fresh": sum(1 for t, m in first.values() if stale(t, m)),
            "recover_s": self.recover_s,
            "machine": machine_name(),
        }

    def close(self) -> None:
        self.plc.close()
        self.broker.stop(signal.SIGKILL)


# --- scenarios ------------------------------------------------------------------------------------
def _fault_in_the_middle(sc: Scenario, cfg: Path, fault, clear, fault_s: float, outage: bool) -> None:
    """Running, then ``fault_s`` with the fault, then running after it cleared. ``outage``: the
    connection is lost (verdicts decided meanwhile must all be late)."""
    svc = sc.service(cfg)
    try:
        time.sleep(sc.seconds / 3)
        t0 = fault()
        time.sleep(fault_s)
        clear()
        if outage:
            sc.down.append((t0, time.time()))
        t_clear = time.monotonic()
        sc.recovered(svc, t_clear)  # frames keep coming: the backlog drains and health clears meanwhile
        time.sleep(max(sc.seconds / 3 - (time.monotonic() - t_clear), 0))
        svc.stop_capture.set()
    finally:
        svc.shutdown(drain_timeout_s=20)


def broker_outage(sc: Scenario) -> None:
    """Broker stopped mid-run for a few seconds, then back."""
    cfg = sc.config([sc.camera(rate_hz=20, loop=True)])
    _fault_in_the_middle(sc, cfg, sc.broker_down, sc.broker.start, sc.seconds / 3, outage=True)


def broker_frozen(sc: Scenario) -> None:
    """SIGSTOP the broker for 2 x late_after_s (connection up, no acks), then SIGCONT. The copies handed
    over before the stall could be seen arrive stale with late: false: the floor for any sender,
    which is why the PLC also compares t_decided with its clock (README)."""

    def freeze() -> float:
        sc.broker.proc.send_signal(signal.SIGSTOP)
        return time.time()

    cfg = sc.config([sc.camera(rate_hz=20, loop=True)], health={"stall_s": 1.0, "restart_after_s": 2.0})
    thaw = lambda: sc.broker.proc.send_signal(signal.SIGCONT)  # noqa: E731
    _fault_in_the_middle(sc, cfg, freeze, thaw, 2 * LATE_AFTER_S, outage=False)


def sigkill_queued(sc: Scenario) -> None:
    """The real service process SIGKILLed with a full queue, then started again."""
    many = sc.dir / "many"
    many.mkdir()
    for i in range(400):
        src = sorted(sc.parts.iterdir())[i % 12]
        shutil.copy(src, many / f"{i:04d}_{src.name}")
    cfg = sc.config([sc.camera(many)], decision={"queue_size": 16}, metrics={"enabled": False})
    proc = subprocess.Popen([sys.executable, "-m", "edge_app.cli", "run", "--config", str(cfg)], cwd=ROOT)
    try:

        def logged() -> int:
            try:
                return sqlite3.connect(sc.db).execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

        _until(lambda: logged() >= 60, 120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    sc.restart_with(4)


def disk_full(sc: Scenario) -> None:
    """Log and archive on a 1 MiB tmpfs that fills, then grows to 64 MiB (root only)."""
    mnt = sc.dir / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"disk_full needs root to mount a tmpfs: {r.stderr.strip()}"
        raise ScenarioSkippedError(msg)
    try:
        sc.db = mnt / "log.sqlite"
        storage = {"database": str(sc.db), "archive_dir": str(mnt / "archive")}
        svc = sc.service(sc.config([sc.camera(rate_hz=25, loop=True)], storage=storage))
        try:
            _until(lambda: svc.outbox.store_error is not None, 60)
            time.sleep(sc.seconds / 2)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            t_clear = time.monotonic()
            sc.recovered(svc, t_clear)
            time.sleep(max(sc.seconds / 2 - (time.monotonic() - t_clear), 0))
            svc.stop_capture.set()
        finally:
            svc.shutdown(drain_timeout_s=20)
        row_db = sc.dir / "log-copy.sqlite"
        shutil.copy(sc.db, row_db)
        sc.db = row_db
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def truncated_images(sc: Scenario) -> None:
    """A camera folder with truncated JPEG/PNG files and a 16-bit PNG among good files."""
    import cv2
    import numpy as np

    folder = sc.dir / "imgs"
    folder.mkdir()
    for i, p in enumerate(sorted(sc.parts.iterdir())):
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        data = cv2.imencode(".jpg" if i % 2 else ".png", img)[1].tobytes()
        ext = ".jpg" if i % 2 else ".png"
        if i % 3 == 0:
            data = data[: len(data) // 3]
        (folder / f"{i:03d}{ext}").write_bytes(data)
    cv2.imwrite(str(folder / "099_deep.png"), np.full((64, 64), 40000, np.uint16))
    t_clear = time.monotonic()
    svc = sc.service(sc.config([sc.camera(folder)]))
    try:
        _until(lambda: sum(svc.counts.values()) >= 13, 30)
        sc.recovered(svc, t_clear)
    finally:
        svc.shutdown(drain_timeout_s=20)


def restart_backlog(sc: Scenario) -> None:
    """The broker is down for a whole run; the next start delivers the backlog."""
    t_down = sc.broker_down()
    svc = sc.service(sc.config([sc.camera()]))
    _until(lambda: sum(svc.counts.values()) >= 12, 30)
    svc.shutdown(drain_timeout_s=0.5)
    sc.broker_up(t_down)
    sc.restart_with(1)  # one more part (an empty folder would be a camera fault)


class ScenarioSkippedError(RuntimeError):
    pass


SCENARIOS = {
    "broker_outage": broker_outage,
    "sigkill_queued": sigkill_queued,
    "disk_full": disk_full,
    "broker_frozen": broker_frozen,
    "truncated_images": truncated_images,
    "restart_backlog": restart_backlog,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each scenario's phases in all")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "faults")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "faults.json")
    args = ap.parse_args()
    os.environ.setdefault("PYLON_CAMEMU", "0")
    args.work.mkdir(parents=True, exist_ok=True)
    calibrated, parts = _fixtures(args.work)
    rows = []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for name in args.scenarios:
            sc = Scenario(name, Path(tmp), calibrated, parts, args.seconds)
            try:
                SCENARIOS[name](sc)
                rows.append(sc.row())
            except ScenarioSkippedError as exc:
                print(f"{name}: skipped ({exc})", file=sys.stderr)
            finally:
                sc.close()
            print(json.dumps(rows[-1]) if rows and rows[-1]["scenario"] == name else "", flush=True)
    cols = [
        "scenario",
        "triggers",
        "stored",
        "delivered",
        "distinct_keys",
        "lost",
        "duplicates",
        "seq_reused",
        "stale_marked_fresh",
        "recover_s",
    ]
    print(f"\nmachine: {machine_name()}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

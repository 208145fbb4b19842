"""End-to-end throughput and latency of the line service: camera -> inspect -> SQLite -> MQTT ack.

    python benchmarks/e2e.py [--frames 600] [--bundle BUNDLE] [--threads 2]

Runs `lineinspect run` as a separate process (as systemd would) against a real mosquitto on a free
loopback port, with (1) the folder camera at full speed, with no station page open and with
--ui-clients live views connected (each reads the live event stream and fetches every picture it
announces, as the browser page does), alternated --repeats times in this one invocation; and (2)
the pylon camera emulator with a software trigger at --pylon-rate-hz. Latency is measured per
verdict from the frame grab to the broker's PUBACK (delivered_at in the decision log); lost =
frames - distinct verdicts received by a subscriber. Prints a table with the per-stage breakdown
and writes benchmarks/results/e2e.json.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _machine import machine_name, mark_defaults  # noqa: E402

from edge_app.demo import start_broker  # noqa: E402


def make_parts(folder: Path, n: int, size: int) -> None:
    import cv2

    from engines.synthetic import render

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kinds = [None, None, None, "scratch", None, "spot", None, "dent"]
    for i in range(n):
        img, _ = render(rng, size, kinds[i % len(kinds)])
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))


def make_calibration(bundle: Path, parts: Path, out: Path) -> Path:
    from calibration.calibfile import Calibration, save_calibration
    from engines.bundle import read_meta, utc_now
    from engines.data import list_images, load_images
    from engines.runtime import load_runtime

    rt = load_runtime("onnxruntime", bundle)
    imgs = load_images(list_images(parts)[:40], rt.size)
    maps, scores = rt.predict(imgs)
    cal = Calibration(
        read_meta(bundle)["onnx"]["sha256"],
        float(np.quantile(scores, 0.9)),
        float(np.quantile(maps, 0.9999)),
        30,
        created_at=utc_now(),
    )
    return save_calibration(cal, out)


class Counter:
    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.keys: set[str] = set()
        self.n = 0
        self.lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{port}")
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(topic, qos=1), ready.set())
        c.on_message = self._msg
        c.connect("127.0.0.1", port)
        c.loop_start()
        ready.wait(10)
        self.client = c

    def _msg(self, client, userdata, msg) -> None:
        key = json.loads(msg.payload)["idempotency_key"]
        with self.lock:
            self.keys.add(key)
            self.n += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class Bench:
    """What every case shares: the model, its calibration, the broker, the work folder, the runtime."""

    bundle: Path
    cal: Path
    port: int
    work: Path
    threads: int
    backend: str
    queue_size: int = 1


class LiveViewClient:
    """One open station page: the live event stream read as it comes, each announced picture fetched."""

    def __init__(self, port: int):
        self.port = port
        self.events = 0
        self.pictures = 0
        self.errors = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import http.client

        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/api/events")
                resp = conn.getresponse()
                if resp.status != 200:
                    raise OSError(f"status {resp.status}")
                pic = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                seen: dict[str, str] = {}
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    if not line.startswith(b"data: "):
                        continue
                    self.events += 1
                    for cam, c in json.loads(line[6:]).get("cameras", {}).items():
                        if c and seen.get(cam) != c["key"]:
                            seen[cam] = c["key"]
                            pic.request("GET", f"/live/{cam}.jpg")
                            r = pic.getresponse()
                            r.read()
                            self.pictures += r.status == 200
                conn.close()
                pic.close()
            except (OSError, ValueError):
                self.errors += 1
                self._stop.wait(0.2)  # the service is still starting (or stopping)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(12)


def run_case(bench: Bench, name: str, camera: dict, frames: int, timeout_s: float, ui_clients: int = 0) -> dict:
    import yaml

    from edge_app.demo import free_port

    bundle, cal, port, work = bench.bundle, bench.cal, bench.port, bench.work
    threads, backend, queue_size = bench.threads, bench.backend, bench.queue_size
    case = work / name
    case.mkdir()
    cfg = {
        "station": {"line": "bench", "station": name},
        "cameras": [camera],
        "model": {"bundle": str(bundle), "backend": backend, "threads": threads},
        "calibration": {"file": str(cal)},
        "decision": {"queue_size": queue_size},
        "mqtt": {"port": port, "topic_prefix": "bench", "inflight_max": 200},
        "storage": {"database": str(case / "log.sqlite"), "archive_dir": str(case / "archive"), "quota_mb": 200},
        "metrics": {"enabled": False},
        "web": {"port": (web_port := free_port())},
    }
    (case / "station.yaml").write_text(yaml.safe_dump(cfg))
    counter = Counter(port, f"bench/bench/{name}/result")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if camera["type"] == "pylon":
        env["PYLON_CAMEMU"] = "1"
    log_file = open(case / "service.log", "w")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_app.cli", "run", "--config", str(case / "station.yaml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    clients = [LiveViewClient(web_port) for _ in range(ui_clients)]
    end = time.monotonic() + timeout_s
    db_path = case / "log.sqlite"
    rss = None
    try:
        while time.monotonic() < end:
            time.sleep(0.25)
            if proc.poll() is not None:
                raise RuntimeError(f"service exited: {(case / 'service.log').read_text()[-2000:]}")
            rss = max(rss or 0, vm_hwm_mb(proc.pid) or 0)
            if not db_path.exists():
                continue
            try:
                with sqlite3.connect(db_path) as db:
                    n, delivered = db.execute("SELECT COUNT(*), COUNT(delivered_at) FROM verdicts").fetchone()
            except sqlite3.OperationalError:  # the file exists a moment before the service creates its table
                continue
            if n >= frames and delivered >= frames:
                break
    finally:
        rss = max(rss or 0, vm_hwm_mb(proc.pid) or 0)
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log_file.close()
    time.sleep(0.5)
    counter.close()
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT t_grab, delivered_at, latency, verdict, key FROM verdicts ORDER BY id").fetchall()
    lat = np.array([(r[1] - r[0]) * 1000 for r in rows if r[1] is not None])
    t0 = min(r[0] for r in rows)
    t1 = max(r[1] for r in rows if r[1] is not None)
    received = len({r[4] for r in rows} & counter.keys)
    stages = {}
    for key in ("queue", "preprocess", "inference", "decide"):
        vals = [json.loads(r[2]).get(key) for r in rows]
        vals = [v for v in vals if v is not None]
        stages[key] = round(float(np.median(vals)), 2) if vals else None
    verdicts = {v: sum(1 for r in rows if r[3] == v) for v in ("ok", "ng", "not_inspected")}
    return {
        "camera": camera["type"],
        "backend": backend,
        "frames": len(rows),
        "verdicts": received,
        "lost": len(rows) - received,
        "verdicts_per_s": round(len(rows) / (t1 - t0), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "rss_mb": round(rss, 1) if rss else None,
        "stage_median_ms": stages,
        "verdict_counts": verdicts,
        "ui_clients": ui_clients,
        "ui_events": sum(c.events for c in clients),
        "ui_pictures": sum(c.pictures for c in clients),
        "machine": machine_name(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--pylon-rate-hz", type=float, default=30.0)
    ap.add_argument(
        "--queue-size", type=int, default=1, help="decision.queue_size (a full-speed replay fills it: deeper = waiting)"
    )
    ap.add_argument("--pylon-frames", type=int, default=300)
    ap.add_argument("--ui-clients", type=int, default=5, help="live views connected in the second folder case")
    ap.add_argument("--repeats", type=int, default=2, help="folder runs without / with live views, alternated")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "e2e.json")
    args = ap.parse_args()

    from latency import ensure_bundle, model_label, network

    bundle = ensure_bundle(args.bundle, args.size)
    work = Path(tempfile.mkdtemp(prefix="lineinspect-e2e-"))
    parts = work / "parts"
    make_parts(parts, min(args.frames, 200), args.size)
    cal = make_calibration(bundle, parts, work / "calibration.yaml")
    broker, port = start_broker(work)
    bench = Bench(bundle, cal, port, work, args.threads, args.backend, args.queue_size)
    rows = []
    try:
        folder_cam = {"id": "cam1", "type": "folder", "path": str(parts), "loop": True}
        runs: dict[int, list[dict]] = {0: [], args.ui_clients: []}
        for i in range(args.repeats):
            for n in (0, args.ui_clients) if i % 2 == 0 else (args.ui_clients, 0):
                runs[n].append(run_case(bench, f"folder{i}ui{n}", folder_cam, args.frames, 300, ui_clients=n))
        for group in runs.values():
            best = sorted(group, key=lambda r: r["verdicts_per_s"])[len(group) // 2]  # the median run
            best = {**best, "runs_verdicts_per_s": [r["verdicts_per_s"] for r in group]}
            best["lost"] = max(r["lost"] for r in group)  # the worst run's losses, not the median's
            rows.append(best)
        pylon_cam = {
            "id": "pylon1",
            "type": "pylon",
            "trigger": {"mode": "software", "software_rate_hz": args.pylon_rate_hz},
            "emulator_image_dir": str(parts),
            "pixel_format": "Mono8",
            "grab_timeout_ms": 500,
        }
        rows.append(run_case(bench, "pylon", pylon_cam, args.pylon_frames, 120))
        for r in rows:
            r["model"], r["network"] = model_label(bundle), network(bundle)  # "default": mark_defaults
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    from engines.bundle import input_hw, read_meta

    h, w = input_hw(read_meta(bundle))
    print(f"machine: {machine_name()}; {h}x{w} model, {args.backend}, {args.threads} threads")
    print(
        f"{'camera':<8}{'ui':>3}{'frames':>7}{'verdicts':>9}{'lost':>5}{'verd/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'RSS MB':>8}  stage medians ms (queue/pre/infer/decide)  runs verd/s"
    )
    for r in rows:
        s = r["stage_median_ms"]
        print(
            f"{r['camera']:<8}{r['ui_clients']:>3}{r['frames']:>7}{r['verdicts']:>9}{r['lost']:>5}"
            f"{r['verdicts_per_s']:>8.1f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['rss_mb'] or 0:>8.0f}  "
            f"{s['queue']}/{s['preprocess']}/{s['inference']}/{s['decide']}  {r.get('runs_verdicts_per_s', '')}"
        )
    base = next((r for r in rows if r["camera"] == "folder" and r["ui_clients"] == 0), None)
    ui = next((r for r in rows if r["camera"] == "folder" and r["ui_clients"] > 0), None)
    if base and ui:
        ratio = ui["verdicts_per_s"] / base["verdicts_per_s"]
        ui["ui_ratio"] = round(ratio, 3)
        print(
            f"with {ui['ui_clients']} live views: {ratio:.1%} of the verdicts/s without "
            f"({ui['ui_events']} events, {ui['ui_pictures']} pictures served; lost {ui['lost']})"
        )
    old = json.loads(args.results.read_text()) if args.results.is_file() else []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(mark_defaults(merge_rows(old, rows)), indent=2) + "\n")
    return 0


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The file's rows of other networks (another ``model`` label: another network or input) kept,
    each with its own machine named; this run's rows replace those of the same network."""
    models = {r["model"] for r in new}
    return [r for r in old if r.get("model") not in models] + new


if __name__ == "__main__":
    sys.exit(main())

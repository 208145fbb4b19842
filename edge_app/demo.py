"""``lineinspect demo``: the whole loop on an embedded default, as a new user would run it.

synthetic parts -> train -> export -> calibrate -> MQTT broker -> the line service on a folder
camera -> live verdicts from the broker -> summary. Each step calls the same ``lineinspect``
subcommands a user would; steps whose output exists are reused on re-runs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

STEP = "\033[1m==>\033[0m " if sys.stdout.isatty() else "==> "


def sh(*args: str) -> None:
    cmd = [sys.executable, "-m", "edge_app.cli", *args]
    print(f"{STEP}lineinspect {' '.join(args)}", flush=True)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        msg = f"'lineinspect {args[0]}' failed (exit {res.returncode})"
        raise SystemExit(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_broker(work: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        msg = "the demo needs an MQTT broker: install mosquitto (apt-get install mosquitto) and run it again"
        raise SystemExit(msg)
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                print(f"{STEP}mosquitto listening on 127.0.0.1:{port}", flush=True)
                return proc, port
        time.sleep(0.05)
    msg = "mosquitto did not start"
    raise SystemExit(msg)


def line_images(parts: Path, out: Path) -> list[str]:
    """The test split as a camera would see it, in a fixed shuffled order; names carry the truth."""
    import random

    from engines.data import eval_items

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    items = eval_items(parts)
    random.Random(1).shuffle(items)
    truth = []
    for i, it in enumerate(items):
        shutil.copy(it.path, out / f"{i:04d}_{it.defect}{it.path.suffix}")
        truth.append(it.defect)
    return truth


def _summary(results: list[dict], truth: list[str], work: Path, t_start: float, keep_open: float) -> None:
    by_seq = {int(r["part_id"]): r for r in results}
    defects = [i for i, t in enumerate(truth, 1) if t != "good"]
    goods = [i for i, t in enumerate(truth, 1) if t == "good"]
    caught = sum(by_seq.get(i, {}).get("verdict") == "ng" for i in defects)
    passed = sum(by_seq.get(i, {}).get("verdict") == "ok" for i in goods)
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("ok", "ng", "not_inspected")}
    lat = sorted(r["latency_ms"].get("total", 0) for r in results)
    print()
    print("summary")
    print(
        f"  parts {len(truth)}, verdicts received {len(results)}: ok {counts['ok']}, ng {counts['ng']}, "
        f"not_inspected {counts['not_inspected']}"
    )
    print(f"  defects caught {caught}/{len(defects)}, good parts passed {passed}/{len(goods)}")
    if lat:
        print(f"  grab-to-decision latency p50 {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms")
    print(f"  everything is in {work} (station.yaml, calibration.html, decisions.sqlite, archive/)")
    if keep_open <= 0:
        print("  to look at the station page after the parts: lineinspect demo --keep-open 600")
    print(f"  demo took {time.monotonic() - t_start:.0f} s")


def main_demo(args) -> int:
    import paho.mqtt.client as mqtt

    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    parts, bundle, cal = work / "parts", work / "bundle", work / "calibration.yaml"
    held_out = work / "calibration_parts"  # good parts the model never saw, for the thresholds
    t_start = time.monotonic()
    sh("make-synthetic", "--out", str(parts), "--size", "256", "--train", str(args.train_images))
    sh("make-synthetic", "--out", str(held_out), "--size", "256", "--train", "120", "--seed", "1")
    if not (bundle / "model.json").is_file():
        sh(
            "train",
            "--data",
            str(parts),
            "--out",
            str(bundle),
            "--epochs",
            str(args.epochs),
            "--image-size",
            str(args.image_size),
        )
    if not json.loads((bundle / "model.json").read_text()).get("onnx"):
        sh("export", "--bundle", str(bundle))
    if not cal.is_file():
        sh(
            "calibrate",
            "--bundle",
            str(bundle),
            "--good",
            str(held_out / "train" / "good"),
            "--defects",
            str(parts),
            "--alpha",
            "0.01",
            "--yes",
            "--out",
            str(cal),
        )
    truth = line_images(parts, work / "line")
    broker, port = start_broker(work)
    web_port = args.web_port if _port_free(args.web_port) else free_port()
    from edge_app.web.auth import hash_password

    password = secrets.token_urlsafe(9)
    users = work / "web_users"
    users.write_text(f"demo:{hash_password(password)}\n")
    users.chmod(0o600)
    station = {
        "station": {"line": "demo", "station": "st1", "description": "lineinspect demo"},
        "cameras": [{"id": "cam1", "type": "folder", "path": str(work / "line"), "rate_hz": args.rate_hz}],
        "model": {"bundle": str(bundle), "backend": args.backend},
        "calibration": {"file": str(cal)},
        "decision": {"queue_size": 8, "deadline_ms": 500},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": "lineinspect"},
        "storage": {"database": str(work / "decisions.sqlite"), "archive_dir": str(work / "archive"), "quota_mb": 100},
        "metrics": {"enabled": True, "port": 0},
        "web": {"port": web_port, "auth": {"users_file": str(users)}},
    }
    cfg_path = work / "station.yaml"
    cfg_path.write_text(yaml.safe_dump(station, sort_keys=False))
    sh("check-config", str(cfg_path))
    (work / "decisions.sqlite").unlink(missing_ok=True)

    results: list[dict] = []
    done = threading.Event()

    def on_message(client, userdata, msg):
        r = json.loads(msg.payload)
        results.append(r)
        seq = int(r["part_id"])
        want = truth[seq - 1] if seq <= len(truth) else "?"
        mark = "" if (r["verdict"] == "ng") == (want != "good") or r["verdict"] == "not_inspected" else "  <- wrong"
        score = f"{r['score']:.2f}" if r["score"] is not None else "  - "
        print(
            f"  part {r['part_id']:>4}  {r['verdict']:<13} score {score} (threshold {r['threshold']:.2f})  "
            f"truth {want:<8} {r['latency_ms'].get('total', 0):6.1f} ms{mark}",
            flush=True,
        )
        if len(results) >= len(truth):
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-plc")
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("lineinspect/demo/st1/result", qos=1)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    print(f"{STEP}lineinspect run --config {cfg_path}  ({len(truth)} parts at {args.rate_hz} per second)", flush=True)
    svc = subprocess.Popen([sys.executable, "-m", "edge_app.cli", "run", "--config", str(cfg_path)])
    print(
        f"{STEP}station page: http://127.0.0.1:{web_port}/  (log in as demo, password {password})",
        flush=True,
    )
    try:
        done.wait(timeout=max(120.0, 3 * len(truth) / args.rate_hz))
        _summary(results, truth, work, t_start, args.keep_open)
        if args.keep_open > 0:
            print(
                f"{STEP}keeping the station and its page open for {args.keep_open:.0f} s: "
                f"http://127.0.0.1:{web_port}/ (Ctrl-C ends)",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.keep_open)
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(60)
        sub.disconnect()
        sub.loop_stop()
        broker.terminate()
        broker.wait(10)

    return 0 if len(results) == len(truth) else 1

"""Real parts for the service tests: a mosquitto broker on a free loopback port (plain, password,
TLS), the pypylon camera emulator, real ONNX Runtime bundles, real SQLite files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

# The pylon emulator must be configured before pypylon is first imported.
os.environ.setdefault("PYLON_CAMEMU", "2")

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A real mosquitto process. ``stop()`` / ``start()`` keep its port, config and persistence."""

    def __init__(self, workdir: Path, password: tuple[str, str] | None = None, tls: bool = False):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        conf = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"log_dest file {self.dir}/mosquitto.log",
            "log_type all",
        ]
        if os.geteuid() == 0:
            # as root mosquitto drops to user "mosquitto", which cannot read pytest's private tmp dirs
            conf.append("user root")
        if password:
            pw = self.dir / "passwd"
            subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), *password], check=True, capture_output=True)
            os.chmod(pw, 0o600)
            conf += ["allow_anonymous false", f"password_file {pw}"]
        else:
            conf += ["allow_anonymous true"]
        if tls:
            self._make_certs()
            conf += [
                f"cafile {self.dir}/ca.crt",
                f"certfile {self.dir}/server.crt",
                f"keyfile {self.dir}/server.key",
                "tls_version tlsv1.2",
            ]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def _make_certs(self) -> None:
        d = self.dir

        def run(*args):
            subprocess.run(args, check=True, capture_output=True, cwd=d)

        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        )
        run(
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        )
        (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        )
        self.ca = d / "ca.crt"

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log_text = (self.dir / "mosquitto.log").read_text() if (self.dir / "mosquitto.log").exists() else ""
                raise RuntimeError(f"mosquitto exited: {err} {log_text[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker_factory(tmp_path: Path):
    brokers: list[Broker] = []

    def make(**kw) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", **kw).start()
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop(signal.SIGKILL)


@pytest.fixture
def broker(broker_factory) -> Broker:
    return broker_factory()


class Listener:
    """A real MQTT subscriber with a persistent session (it gets QoS 1 messages sent while it was away)."""

    def __init__(self, broker: Broker, topic: str, auth: tuple[str, str] | None = None, client_id: str = "test-plc"):
        self.messages: list[tuple[str, dict | str, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if auth:
            c.username_pw_set(*auth)
        if broker.tls:
            c.tls_set(ca_certs=str(broker.ca))
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(topic, qos=1), self.connected.set())
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 0.5)
        c.connect_async("127.0.0.1", broker.port, keepalive=10)
        c.loop_start()
        self.client = c
        assert self.connected.wait(10), "test subscriber could not connect"

    def _on_message(self, client, userdata, msg) -> None:
        try:
            payload = json.loads(msg.payload.decode())
        except (ValueError, UnicodeDecodeError):
            payload = msg.payload.decode(errors="replace")
        with self.lock:
            self.messages.append((msg.topic, payload, bool(msg.retain)))

    def on(self, suffix: str) -> list:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, suffix: str, n: int, timeout: float = 30.0) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.on(suffix)
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return self.on(suffix)

    def publish(self, topic: str, payload: dict | str) -> None:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener_factory():
    made: list[Listener] = []

    def make(*a, **kw) -> Listener:
        lst = Listener(*a, **kw)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, exported_bundle, synthetic_root) -> dict:
    """The exported tiny bundle + a calibration file made from its scores on good parts."""
    return make_calibration(exported_bundle, synthetic_root, tmp_path_factory.mktemp("cal"))


def make_calibration(exported_bundle: Path, synthetic_root: Path, out_dir: Path) -> dict:
    """A calibration for ``exported_bundle`` from its scores on the synthetic good parts (plain function:
    benchmarks/faults.py uses it too)."""
    from calibration.calibfile import Calibration, save_calibration
    from engines.bundle import read_meta, utc_now
    from engines.data import eval_items, preprocess
    from engines.runtime import load_runtime

    rt = load_runtime("onnxruntime", exported_bundle)
    items = eval_items(synthetic_root)
    # scored as the mono line camera (part_images) sees them
    good = np.stack(
        [preprocess(cv2.imread(str(it.path), cv2.IMREAD_GRAYSCALE), 128) for it in items if not it.is_defect]
    )
    maps, scores = rt.predict(good)
    meta = read_meta(exported_bundle)
    cal = Calibration(
        model_onnx_sha256=meta["onnx"]["sha256"],
        image_threshold=float(scores.max() + 0.5),
        pixel_threshold=float(np.quantile(maps, 0.9999) + 0.5),
        min_defect_area_px=20,
        method={"image": "test fixture: max good score + 0.5"},
        samples={"n_good": len(good)},
        created_at=utc_now(),
    )
    path = save_calibration(cal, out_dir / "calibration.yaml")
    return {"bundle": exported_bundle, "calibration": path, "cal": cal}


@pytest.fixture(scope="session")
def part_images(tmp_path_factory, synthetic_root) -> Path:
    """A folder of 12 camera images (6 good, 6 defective), named in order, as a line camera would see."""
    return make_part_images(synthetic_root, tmp_path_factory.mktemp("parts"))


def make_part_images(synthetic_root: Path, out: Path) -> Path:
    from engines.data import eval_items

    items = eval_items(synthetic_root)
    good = [it for it in items if not it.is_defect][:6]
    bad = [it for it in items if it.is_defect][:6]
    for i, it in enumerate([x for pair in zip(good, bad, strict=True) for x in pair]):
        img = cv2.imread(str(it.path), cv2.IMREAD_GRAYSCALE)  # mono camera
        cv2.imwrite(str(out / f"{i:03d}_{it.defect}.png"), img)
    return out


def until(cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` every 50 ms until it holds or ``timeout`` s pass; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def write_config(
    path: Path, calibrated: dict, broker: Broker | None, tmp: Path, cameras: list[dict], **sections
) -> Path:
    cfg = {
        "station": {"line": "L1", "station": "S1"},
        "cameras": cameras,
        "model": {"bundle": str(calibrated["bundle"]), "backend": "onnxruntime", "threads": 1, "warmup_runs": 1},
        "calibration": {"file": str(calibrated["calibration"])},
        "decision": {"queue_size": 64},
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port if broker else free_port(),
            "topic_prefix": "test",
            "stats_interval_s": 1.0,
            "late_after_s": 30,
        },
        "storage": {"database": str(tmp / "log.sqlite"), "archive_dir": str(tmp / "archive"), "quota_mb": 50},
        "metrics": {"enabled": True, "port": 0},
        "web": {"port": 0},
    }
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **val}
        else:
            cfg[key] = val
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path

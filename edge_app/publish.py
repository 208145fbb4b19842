"""MQTT (paho-mqtt v2 API): verdicts from the outbox at QoS 1, retained status with last will,
periodic stats, and commands on ``<prefix>/<line>/<station>/cmd/<name>``.

Verdicts are published oldest first from the decision log, at most ``inflight_max`` awaiting
their PUBACK; each ack marks its row delivered. On a disconnect the unacknowledged rows are
published again after reconnecting (QoS 1: at least once; the idempotency key lets the PLC
drop a duplicate). Verdicts sent after an outage, a restart or ``late_after_s`` carry
``"late": true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_app.config import MqttConfig, StationConfig, read_secret
from edge_app.store import DecisionLog, Row

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
COMMANDS = ("reload_calibration", "pause", "resume", "trigger", "part_id")


def topic_base(mqtt_cfg: MqttConfig, station: StationConfig) -> str:
    return f"{mqtt_cfg.topic_prefix.rstrip('/')}/{station.line}/{station.station}"


def result_payload(row: Row, late: bool, line: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "idempotency_key": row.key,
        "line": line,
        "station": row.station,
        "camera": row.camera_id,
        "part_id": row.part_id,
        "seq": row.seq,
        "verdict": row.verdict,
        "reason": row.reason,
        "score": row.score,
        "threshold": row.threshold,
        "regions": row.regions,
        "t_grab": round(row.t_grab, 6),
        "t_decided": round(row.t_decided, 6),
        "latency_ms": row.latency,
        "model_sha256": row.model_sha,
        "calibration_id": row.calibration_id,
        "late": late,
        "detail": row.detail or "",
    }


class Publisher:
    def __init__(
        self,
        cfg: MqttConfig,
        station: StationConfig,
        log_db: DecisionLog,
        on_command: Callable[[str, dict], dict],
        metrics=None,
        started_at: float | None = None,
    ):
        self.cfg = cfg
        self.station = station
        self.db = log_db
        self.on_command = on_command
        self.metrics = metrics
        self.base = topic_base(cfg, station)
        self.started_at = started_at or time.time()
        self.cond = threading.Condition()
        self.inflight: dict[int, int] = {}  # mid -> row id
        self.early_acks: set[int] = set()
        self.cursor = 0
        self.connected = False
        # set when the broker has acknowledged the cmd/+ subscription: commands sent from then on reach us
        self.commands_ready = threading.Event()
        self.last_error: str | None = None
        self.auth_failed = False
        self._stop = threading.Event()
        self.status_info: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self.heartbeat = time.monotonic()
        self.client = self._make_client()

    # --- client ---------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        client_id = cfg.client_id or f"lineinspect-{self.station.line}-{self.station.station}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if cfg.username:
            c.username_pw_set(cfg.username, read_secret(cfg))
        if cfg.tls:
            for f in (cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file):
                if f is not None and not f.is_file():
                    msg = f"mqtt.tls: file not found: {f}"
                    raise ValueError(msg)
            c.tls_set(
                ca_certs=str(cfg.tls.ca_file),
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            c.tls_insecure_set(cfg.tls.insecure_skip_hostname_check)
        c.will_set(f"{self.base}/status", json.dumps(self._status("offline")), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=cfg.reconnect_max_s)
        c.max_inflight_messages_set(cfg.inflight_max)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        return c

    def _status(self, state: str) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "state": state,
            "line": self.station.line,
            "station": self.station.station,
            "t": round(time.time(), 3),
            **({k: v for k, v in self.status_info.items()} if state != "offline" else {}),
        }

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        self.thread.start()

    # --- callbacks (paho network thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            self.auth_failed = reason_code.value in (4, 5, 134, 135)  # bad credentials / not authorised
            log.error(
                "MQTT %s:%s: %s%s",
                self.cfg.host,
                self.cfg.port,
                self.last_error,
                " (check mqtt.username and the password file)" if self.auth_failed else "",
            )
            if self.metrics:
                self.metrics.inc("mqtt_connect_failures_total", reason=str(reason_code))
            return
        log.info("MQTT connected to %s:%s", self.cfg.host, self.cfg.port)
        self.auth_failed = False
        self.last_error = None
        client.subscribe(f"{self.base}/cmd/+", qos=1)
        client.publish(f"{self.base}/status", json.dumps(self._status("online")), qos=1, retain=True)
        with self.cond:
            self.connected = True
            self.inflight.clear()
            self.early_acks.clear()
            self.cursor = 0  # publish again everything not acknowledged, oldest first
            self.cond.notify_all()
        if self.metrics:
            self.metrics.set("mqtt_connected", 1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("MQTT broker refused the command subscription %s/cmd/+: %s", self.base, failed[0])
            return
        self.commands_ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.commands_ready.clear()
        with self.cond:
            was = self.connected
            self.connected = False
            self.inflight.clear()
            self.cond.notify_all()
        if was:
            log.warning("MQTT disconnected (%s); verdicts wait in the outbox", reason_code)
        if self.metrics:
            self.metrics.set("mqtt_connected", 0)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.cond:
            row_id = self.inflight.pop(mid, None)
            if row_id is None:
                self.early_acks.add(mid)  # acked before publish() returned its mid to us
            self.cond.notify_all()
        if row_id is not None:
            self._delivered(row_id)

    def _delivered(self, row_id: int) -> None:
        self.db.mark_delivered(row_id, time.time())
        if self.metrics:
            self.metrics.inc("verdicts_delivered_total")

    def _on_message(self, client, userdata, msg) -> None:
        name = msg.topic.rsplit("/", 1)[-1]
        payload: Any = {}
        try:
            payload = json.loads(msg.payload.decode() or "{}") if msg.payload else {}
            if not isinstance(payload, dict):
                msg_ = "payload must be a JSON object"
                raise ValueError(msg_)
            if name not in COMMANDS:
                msg_ = f"unknown command {name!r}; commands: {', '.join(COMMANDS)}"
                raise ValueError(msg_)
            result = self.on_command(name, payload)
        except (ValueError, UnicodeDecodeError) as exc:
            result = {"ok": False, "error": str(exc)}
            log.warning("MQTT command %s refused: %s", name, exc)
        reply = {"schema_version": SCHEMA_VERSION, "command": name, "t": round(time.time(), 3), **result}
        if isinstance(payload, dict) and "request_id" in payload:
            reply["request_id"] = payload["request_id"]
        client.publish(f"{self.base}/cmd_result", json.dumps(reply), qos=1)

    # --- outbox drain ----------------------------------------------------------------------
    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            with self.cond:
                if self._stop.is_set():
                    break
                room = self.cfg.inflight_max - len(self.inflight)
                ready = self.connected and room > 0
                cursor = self.cursor
            if ready:
                rows = self.db.pending(after_id=cursor, limit=room)
                for row in rows:
                    if not self._publish_row(row):
                        break
                if rows:
                    continue
            with self.cond:
                self.cond.wait(timeout=0.2)

    def _publish_row(self, row: Row) -> bool:
        now = time.time()
        late = row.attempts > 0 or row.created_at < self.started_at or now - row.t_decided > self.cfg.late_after_s
        payload = json.dumps(result_payload(row, late, self.station.line))
        if not self.connected:
            return False
        # never call into paho while holding self.cond: paho's network thread holds its own locks
        # while it runs on_publish, which takes self.cond (lock-order inversion otherwise)
        info = self.client.publish(f"{self.base}/result", payload, qos=self.cfg.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self.cond:
            self.cursor = row.id
            acked = info.mid in self.early_acks
            if acked:
                self.early_acks.discard(info.mid)
            else:
                self.inflight[info.mid] = row.id
        self.db.mark_published(row.id, now)
        if acked:
            self._delivered(row.id)
        if self.cfg.plain_payload:
            self.client.publish(f"{self.base}/result/plain", f"{row.part_id};{row.verdict}", qos=self.cfg.qos)
        if self.metrics:
            self.metrics.inc("verdicts_published_total", late=str(late).lower())
        return True

    def publish_status(self, **info: Any) -> None:
        self.status_info.update(info)
        if self.connected:
            self.client.publish(f"{self.base}/status", json.dumps(self._status("online")), qos=1, retain=True)

    def publish_stats(self, stats: dict[str, Any]) -> None:
        if self.connected:
            msg = {"schema_version": SCHEMA_VERSION, "t": round(time.time(), 3), **stats}
            self.client.publish(f"{self.base}/stats", json.dumps(msg), qos=0)

    def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (all acknowledged) or the timeout; True when empty."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.db.backlog() == 0:
                return True
            self.notify()
            time.sleep(0.05)
        return self.db.backlog() == 0

    def stop(self) -> None:
        self._stop.set()
        self.notify()
        if self.thread.ident is not None:  # a publisher that never started has nothing to join
            self.thread.join(5)
        if self.connected:
            info = self.client.publish(f"{self.base}/status", json.dumps(self._status("offline")), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

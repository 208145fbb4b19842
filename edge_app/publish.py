"""MQTT (paho-mqtt v2 API): verdicts from the outbox at QoS 1, retained status with last will,
periodic stats, and commands on ``<prefix>/<line>/<station>/cmd/<name>``.

Verdicts are published oldest first from the outbox (``edge_app.outbox``), at most
``inflight_max`` awaiting their PUBACK; each ack marks its row delivered.

The lateness rule a PLC can rely on:

- a verdict is handed to the MQTT client only while it is connected, and every connection has a
  client of its own (paho's automatic reconnect is off): no copy outlives the connection it was
  handed to, so paho never re-sends an old copy after an outage;
- after a reconnect every unacknowledged verdict is sent again from the outbox (QoS 1: at least
  once; the idempotency key lets the PLC drop a duplicate), oldest first;
- while a copy has waited longer than min(0.5 s, late_after_s / 4) for its ack, no further copy
  is handed over: they would only queue behind it in a connection that is not moving (a frozen
  broker, a dead link not yet noticed) and reach the PLC stale but marked fresh;
- ``late`` is decided for each copy when it is handed over: true when the verdict was decided
  before the current connection came up (an outage, a restart, a slow first connect), was
  handed to an earlier connection, or is older than ``late_after_s``. A PLC should still compare
  ``t_decided`` with its own clock for the part in front of the gate.
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
from edge_app.outbox import Outbox
from edge_app.store import Row

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
        outbox: Outbox,
        on_command: Callable[[str, dict], dict],
        metrics=None,
        started_at: float | None = None,
    ):
        self.cfg = cfg
        self.station = station
        self.outbox = outbox
        self.on_command = on_command
        self.metrics = metrics
        self.base = topic_base(cfg, station)
        self.started_at = started_at or time.time()
        self.cond = threading.Condition()
        self.inflight: dict[int, str] = {}  # mid -> verdict key, of the current connection
        self.handed_at: dict[int, float] = {}  # mid -> monotonic time it was handed to paho
        self.early_acks: set[int] = set()
        self.sent: set[str] = set()  # keys handed to the current connection
        self.cursor = 0  # highest logged row id handed to the current connection
        self.connected = False
        self.connected_since: float | None = None  # time.time() the current connection came up
        self.last_delivery = time.monotonic()  # the last ack, or the last time nothing was waiting
        # set when the broker has acknowledged the cmd/+ subscription: commands sent from then on reach us
        self.commands_ready = threading.Event()
        self.last_error: str | None = None
        self.auth_failed = False
        self.errors = 0  # unexpected exceptions caught in the publisher thread
        self._stop = threading.Event()
        self._lost = False  # the current client's connection ended: the thread makes a new one
        self._backoff = 1.0
        self._retry_at = 0.0
        self.ack_hold_s = min(0.5, cfg.late_after_s / 4)
        self.status_info: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self.heartbeat = time.monotonic()
        self.secret = read_secret(cfg) if cfg.username else None
        self.client = self._make_client()

    # --- client ---------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        client_id = cfg.client_id or f"lineinspect-{self.station.line}-{self.station.station}"
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, reconnect_on_failure=False
        )
        if cfg.username:
            c.username_pw_set(cfg.username, self.secret)
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
        # the broker sends the will when this connection dies: it says so, and carries no time of
        # its own (it is written now, long before it is sent); t_connected is when the client was made
        will = {
            "schema_version": SCHEMA_VERSION,
            "state": "offline",
            "line": self.station.line,
            "station": self.station.station,
            "reason": "connection lost (last will, sent by the broker)",
            "t_connected": round(time.time(), 3),
        }
        c.will_set(f"{self.base}/status", json.dumps(will), qos=1, retain=True)
        # no automatic reconnect (reconnect_on_failure=False): a failed or lost connection ends this
        # client, and the publisher thread makes a new one after its back-off (1 s doubling to
        # reconnect_max_s)
        c.max_inflight_messages_set(cfg.inflight_max)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = self._on_connect_fail
        return c

    def _status(self, state: str, **extra: Any) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "state": state,
            "line": self.station.line,
            "station": self.station.station,
            "t": round(time.time(), 3),
            **({k: v for k, v in self.status_info.items()} if state != "offline" else {}),
            **extra,
        }

    def start(self) -> None:
        self._connect(self.client)
        self.thread.start()

    def _connect(self, client: mqtt.Client) -> None:
        client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        client.loop_start()

    def _replace_client(self) -> None:
        """A lost connection's client is dropped with whatever it still holds; a new one connects."""
        old = self.client
        with contextlib.suppress(Exception):
            old.disconnect()
        with contextlib.suppress(Exception):
            old.loop_stop()
        with self.cond:
            self._lost = False
        self.client = self._make_client()
        self._connect(self.client)

    @property
    def state(self) -> str:
        """online / degraded, as the retained status says (set by the service's health check)."""
        return self.status_info.get("state", "online")

    # --- callbacks (paho network thread) ---------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self.client:
            return
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
        self._backoff = 1.0
        client.subscribe(f"{self.base}/cmd/+", qos=1)
        client.publish(f"{self.base}/status", json.dumps(self._status(self.state)), qos=1, retain=True)
        with self.cond:
            self._lost = False  # paho's own retry of a first connection came through: keep this client
            self.connected = True
            self.connected_since = time.time()
            self.last_delivery = time.monotonic()
            self.inflight.clear()
            self.handed_at.clear()
            self.early_acks.clear()
            self.sent.clear()
            self.cursor = 0  # publish again everything not acknowledged, oldest first
            self.cond.notify_all()
        if self.metrics:
            self.metrics.set("mqtt_connected", 1)

    def _on_connect_fail(self, client, userdata) -> None:
        if client is self.client:
            self.last_error = f"cannot connect to {self.cfg.host}:{self.cfg.port}"
            with self.cond:
                self._lost = True  # the publisher thread tries again with a new client after its back-off
                self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("MQTT broker refused the command subscription %s/cmd/+: %s", self.base, failed[0])
            return
        self.commands_ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if client is not self.client:
            return
        self.commands_ready.clear()
        with self.cond:
            was = self.connected
            self.connected = False
            self.connected_since = None
            self.inflight.clear()
            self.handed_at.clear()
            self._lost = True
            self.cond.notify_all()
        if was and not self._stop.is_set():
            self.last_error = f"connection lost ({reason_code})"
            log.warning("MQTT disconnected (%s); verdicts wait in the outbox", reason_code)
        if self.metrics:
            self.metrics.set("mqtt_connected", 0)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if client is not self.client:
            return
        with self.cond:
            key = self.inflight.pop(mid, None)
            self.handed_at.pop(mid, None)
            if key is None:
                self.early_acks.add(mid)  # acked before publish() returned its mid to us
            else:
                self.sent.discard(key)  # delivered: nothing will offer it again (bounded set)
            self.cond.notify_all()
        if key is not None:
            self._delivered(key)

    def _delivered(self, key: str) -> None:
        self.outbox.mark_delivered(key, time.time())
        self.last_delivery = time.monotonic()
        if self.metrics:
            self.metrics.inc("verdicts_delivered_total")

    def _on_message(self, client, userdata, msg) -> None:
        name = msg.topic.rsplit("/", 1)[-1]
        payload: Any = {}
        try:
            try:
                payload = json.loads(msg.payload.decode() or "{}") if msg.payload else {}
            except json.JSONDecodeError as exc:
                msg_ = f'command payload is not JSON ({exc}); send a JSON object, e.g. {{}} or {{"part_id": "A1"}}'
                raise ValueError(msg_) from exc
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
        except Exception as exc:  # a command must never take paho's network thread down
            result = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            log.exception("MQTT command %s failed", name)
        reply = {"schema_version": SCHEMA_VERSION, "command": name, "t": round(time.time(), 3), **result}
        if isinstance(payload, dict) and "request_id" in payload:
            reply["request_id"] = payload["request_id"]
        client.publish(f"{self.base}/cmd_result", json.dumps(reply), qos=1)

    # --- outbox drain ----------------------------------------------------------------------
    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                if self._step():
                    continue
            except Exception:  # never die silently: log, count, go on
                self.errors += 1
                log.exception("MQTT publisher: unexpected error (%d so far); continuing", self.errors)
                if self.metrics:
                    self.metrics.inc("thread_errors_total", thread="mqtt-publisher")
                self._stop.wait(0.5)
                continue
            with self.cond:
                self.cond.wait(timeout=0.2)

    def _step(self) -> bool:
        """One round: reconnect if due, publish what fits. True when it published something."""
        if self._lost and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.cfg.reconnect_max_s)
            self._replace_client()
            return False
        with self.cond:
            room = self.cfg.inflight_max - len(self.inflight)
            oldest = min(self.handed_at.values(), default=None)
            # a connection that has not acked a copy for ACK_HOLD_S gets no more: they would only
            # queue behind it (a frozen broker, a dead link not yet noticed) and arrive stale
            acking = oldest is None or time.monotonic() - oldest < self.ack_hold_s
            ready = self.connected and room > 0 and acking
            cursor = self.cursor
            skip = set(self.sent)
        if not ready:
            return False
        rows = self.outbox.pending(cursor, room, skip)
        sent = False
        for row in rows:
            if not self._publish_row(row):
                break
            sent = True
        return sent

    def is_late(self, row: Row, now: float) -> bool:
        """The lateness of a copy handed over now (the rule in this module's docstring)."""
        since = self.connected_since
        return row.attempts > 0 or since is None or row.t_decided < since or now - row.t_decided > self.cfg.late_after_s

    def _publish_row(self, row: Row) -> bool:
        now = time.time()
        client = self.client
        with self.cond:
            if not self.connected:
                return False
            late = self.is_late(row, now)
        payload = json.dumps(result_payload(row, late, self.station.line))
        # never call into paho while holding self.cond: paho's network thread holds its own locks
        # while it runs on_publish, which takes self.cond (lock-order inversion otherwise)
        info = client.publish(f"{self.base}/result", payload, qos=self.cfg.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        with self.cond:
            if client is not self.client or not self.connected:
                return False  # lost while handing over: the copy dies with its client
            if row.id is not None:
                self.cursor = max(self.cursor, row.id)
            self.sent.add(row.key)
            acked = info.mid in self.early_acks
            if acked:
                self.early_acks.discard(info.mid)
                self.sent.discard(row.key)
            else:
                self.inflight[info.mid] = row.key
                self.handed_at[info.mid] = time.monotonic()
        self.outbox.mark_published(row.key, now)
        if acked:
            self._delivered(row.key)
        if self.cfg.plain_payload:
            client.publish(f"{self.base}/result/plain", f"{row.part_id};{row.verdict}", qos=self.cfg.qos)
        if self.metrics:
            self.metrics.inc("verdicts_published_total", late=str(late).lower())
        return True

    def publish_status(self, **info: Any) -> None:
        self.status_info.update(info)
        if self.connected:
            self.client.publish(f"{self.base}/status", json.dumps(self._status(self.state)), qos=1, retain=True)

    def publish_stats(self, stats: dict[str, Any]) -> None:
        if self.connected:
            msg = {"schema_version": SCHEMA_VERSION, "t": round(time.time(), 3), **stats}
            self.client.publish(f"{self.base}/stats", json.dumps(msg), qos=0)

    def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (all acknowledged) or the timeout; True when empty."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.outbox.backlog() == 0:
                return True
            self.notify()
            time.sleep(0.05)
        return self.outbox.backlog() == 0

    def stop(self) -> None:
        self._stop.set()
        self.notify()
        if self.thread.ident is not None:  # a publisher that never started has nothing to join
            self.thread.join(5)
        client = self.client
        if self.connected:
            info = client.publish(
                f"{self.base}/status", json.dumps(self._status("offline", reason="stopped")), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        client.disconnect()
        client.loop_stop()

"""The line service: capture -> durable trigger -> bounded queue -> inspect -> decide -> outbox -> MQTT.

Threads share one stop event. Every trigger yields exactly one verdict, made by
``edge_app.decide.decide``: grab failures, incomplete images, skipped buffers, queue overruns,
runtime errors, pauses and deadline misses become ``not_inspected`` with a reason. A grabbed
trigger is recorded in the decision log before it is queued; after a crash, each trigger without
a verdict gets ``not_inspected`` / ``service_restart`` at the next start, and its sequence number
is never reused. SIGTERM drains in-flight frames (their verdicts are stored and published),
SIGHUP reloads the calibration. sd_notify READY after warm-up; WATCHDOG only while
``edge_app.health.assess`` finds no reason to restart (threads alive and turning, delivery
progressing while the broker is up).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from calibration.calibfile import CalibrationError, load_calibration
from edge_app.capture import Camera, CameraError, make_camera
from edge_app.config import ConfigError, ServiceConfig, load_config
from edge_app.decide import NotInspected
from edge_app.frame import Frame, Verdict
from edge_app.health import Health, HealthLimits, Observation, assess
from edge_app.inspect import Inspector
from edge_app.live import LiveBoard
from edge_app.metrics import Metrics, MetricsServer
from edge_app.outbox import Outbox
from edge_app.publish import Publisher
from edge_app.sdnotify import Notifier
from edge_app.store import Archive, DecisionLog, StoreError, StoreUnavailableError

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start; the message says what to fix."""


def _describe_metrics(m: Metrics) -> None:
    m.describe("frames_total", "counter", "frames (triggers) seen, by camera")
    m.describe("verdicts_total", "counter", "verdicts by kind")
    m.describe("not_inspected_total", "counter", "not_inspected verdicts by reason")
    m.describe("verdicts_published_total", "counter", "verdict messages published (late or not)")
    m.describe("verdicts_delivered_total", "counter", "verdict messages acknowledged by the broker")
    m.describe("stage_latency_ms", "histogram", "latency per stage in milliseconds")
    m.describe("total_latency_ms", "histogram", "grab to decision in milliseconds")
    m.describe("queue_depth", "gauge", "frames waiting for inspection")
    m.describe("outbox_backlog", "gauge", "verdicts not yet acknowledged by the broker")
    m.describe("camera_reconnects_total", "counter", "camera reopen attempts after a loss")
    m.describe("camera_connected", "gauge", "1 while the camera is open")
    m.describe("mqtt_connected", "gauge", "1 while connected to the broker")
    m.describe("mqtt_connect_failures_total", "counter", "refused broker connections")
    m.describe(
        "store_errors_total", "counter", "decision log write failures (verdicts kept in memory, still published)"
    )
    m.describe("store_rejected_total", "counter", "verdicts that can never be logged (duplicate key), set aside")
    m.describe("store_unstored", "gauge", "verdicts waiting in memory for a writable decision log")
    m.describe(
        "unlogged_delivered_total", "counter", "delivered verdicts dropped from memory while the log stayed unwritable"
    )
    m.describe("triggers_unrecorded_total", "counter", "triggers that could not be made durable before inspection")
    m.describe("archive_dropped_total", "counter", "images not archived (queue full or disk error)")
    m.describe("thread_errors_total", "counter", "unexpected exceptions caught in a service thread")
    m.describe("health_degraded", "gauge", "1 while the service is degraded (see health_reason)")
    m.describe("health_reason", "gauge", "1 for each current reason the service is degraded")
    m.describe("watchdog_withheld", "gauge", "1 while WATCHDOG=1 is withheld so that systemd restarts the service")
    # every counter exists from the start, at 0: a scrape never has to guess "absent = 0"
    for name in (
        "verdicts_published_total",
        "verdicts_delivered_total",
        "store_errors_total",
        "store_rejected_total",
        "triggers_unrecorded_total",
        "unlogged_delivered_total",
        "archive_dropped_total",
        "mqtt_connect_failures_total",
    ):
        m.inc(name, 0)
    for verdict in ("ok", "ng", "not_inspected"):
        m.inc("verdicts_total", 0, verdict=verdict)
    for name, value in (("health_degraded", 0), ("watchdog_withheld", 0), ("mqtt_connected", 0), ("store_unstored", 0)):
        m.set(name, value)


def _without_id(cam_id: str, exc: Exception) -> str:
    """Camera errors already start with "[id] ": don't print it twice."""
    text = str(exc)
    prefix = f"[{cam_id}] "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _with_id(cam_id: str, exc: Exception) -> str:
    return f"[{cam_id}] {_without_id(cam_id, exc)}"


class CameraWorker:
    def __init__(self, svc: Service, cam: Camera):
        self.svc = svc
        self.cam = cam
        self.cfg = cam.cfg
        self.thread = threading.Thread(
            target=svc.guarded(f"capture-{cam.id}", self._run), name=f"capture-{cam.id}", daemon=True
        )
        self.heartbeat = time.monotonic()
        self.connected = False
        self.part_ids: collections.deque[str] = collections.deque()
        self.paced_by_line = cam.paced_by_line
        self.part_cond = threading.Condition()

    def _assign_part_id(self, f: Frame) -> None:
        src = self.cfg.part_id
        if f.detail == "part id from trigger":
            pass
        elif src.source == "block_id" and f.block_id is not None:
            f.part_id = str(f.block_id)
        elif src.source == "mqtt":
            with self.part_cond:
                if not self.part_ids:
                    self.part_cond.wait(src.mqtt_wait_ms / 1000)
                if self.part_ids:
                    f.part_id = self.part_ids.popleft()
                else:
                    f.part_id = f"missing-{f.seq}"
                    f.detail = (f.detail + "; " if f.detail else "") + "no part id from the PLC in time"
        f.part_id = f"{src.prefix}{f.part_id}"

    def push_part_id(self, part_id: str) -> None:
        with self.part_cond:
            self.part_ids.append(part_id)
            self.part_cond.notify_all()

    def _run(self) -> None:
        backoff = self.cfg.reconnect.initial_ms / 1000
        stop = self.svc.stop_capture
        m = self.svc.metrics
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            if not self.connected:
                try:
                    self.cam.open()
                    self.connected = True
                    backoff = self.cfg.reconnect.initial_ms / 1000
                    m.set("camera_connected", 1, camera=self.cam.id)
                    self.svc.camera_state(self.cam.id, "connected")
                except CameraError as exc:
                    log.error("%s; retrying in %.1f s", _with_id(self.cam.id, exc), backoff)
                    self.svc.camera_state(self.cam.id, f"reconnecting: {exc}")
                    m.inc("camera_reconnects_total", camera=self.cam.id)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, self.cfg.reconnect.max_ms / 1000)
                    continue
            if self.paced_by_line and self.svc.queue.full():
                # a replay grabs its next frame only when the line can take it (grab time = entry time)
                self.svc.room.wait(0.2)
                self.svc.room.clear()
                continue
            try:
                frames = self.cam.grab(self.cfg.grab_timeout_ms / 1000)
            except CameraError as exc:
                log.error("[%s] camera lost: %s", self.cam.id, _without_id(self.cam.id, exc))
                self.connected = False
                m.set("camera_connected", 0, camera=self.cam.id)
                self.svc.camera_state(self.cam.id, f"lost: {exc}")
                self.cam.close()
                continue
            for f in frames:
                self._assign_part_id(f)
                self.svc.submit(f, wait=self.paced_by_line)
            if self.cam.exhausted:
                self.svc.camera_state(self.cam.id, "finished")
                self.svc.finished_camera(self.cam.id)
                break
        self.cam.close()
        m.set("camera_connected", 0, camera=self.cam.id)


class Service:
    """Composition root: opens each part in order, and closes what it opened when a later part fails."""

    def __init__(self, cfg: ServiceConfig, config_path: Path | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.stop_capture = threading.Event()
        self.paused = threading.Event()
        self.metrics = Metrics()
        _describe_metrics(self.metrics)
        self.notifier = Notifier()
        self.started_at = time.time()
        self.queue: queue.Queue[Frame] = queue.Queue(maxsize=cfg.decision.queue_size)
        self.room = threading.Event()  # set when the inspector takes a frame off the queue
        self.counts = collections.Counter()
        self.cam_states: dict[str, str] = {}
        self.finished: set[str] = set()
        self.worker_heartbeat = time.monotonic()
        self.dead_threads: dict[str, str] = {}
        self.health = Health("ok")
        h = cfg.health
        self.limits = HealthLimits(h.heartbeat_max_age_s, h.stall_s, h.restart_after_s, h.store_restart_after_s)
        self._sink_lock = threading.Lock()
        self._opened: list[Any] = []  # closed in reverse order by shutdown() or a failed start
        self.ok_counter = 0
        self.board = LiveBoard()  # what the station page shows live (fed by sink, never waits)
        self.web = None
        self.web_error: str | None = None
        try:
            self._open_parts()
        except BaseException:
            self._close_opened()
            raise

    def _open_parts(self) -> None:
        cfg = self.cfg
        from engines.bundle import BundleError
        from engines.runtime import ModelFileError, SDKMissingError, load_runtime

        try:
            self.runtime = load_runtime(cfg.model.backend, cfg.model.bundle, **cfg.model.runtime_options())
        except (BundleError, ModelFileError, SDKMissingError, ValueError) as exc:
            raise StartupError(f"model: {exc}") from exc
        self._opened.append(self.runtime)
        try:
            cal = load_calibration(cfg.calibration.file, self.runtime.model_sha256)
        except CalibrationError as exc:
            raise StartupError(f"calibration: {exc}") from exc
        scored_on = (cal.samples.get("backend"), cal.samples.get("device"))
        if scored_on[1] is not None and scored_on != (self.runtime.name, self.runtime.device):
            # same model, other arithmetic (e.g. bf16 vs f32): scores differ by up to ~0.7 on the
            # normalised map (benchmarks/backend_accuracy.py), so the thresholds are a little off
            log.warning(
                "calibration %s was scored with %s on %s, this station runs %s on %s: recalibrate with the "
                "station's backend and precision (lineinspect calibrate --config ...)",
                cfg.calibration.file,
                *scored_on,
                self.runtime.name,
                self.runtime.device,
            )
        self.inspector = Inspector(self.runtime, cal, cfg.station.station)
        try:
            self.db = DecisionLog(cfg.storage.database)
        except StoreError as exc:
            raise StartupError(f"storage: {exc}") from exc
        self._opened.append(self.db)
        self.outbox = Outbox(self.db, self.metrics)
        self.archive = Archive(cfg.storage.archive_dir, cfg.storage.quota_mb)
        self._opened.append(self.archive)
        try:
            self.publisher = Publisher(cfg.mqtt, cfg.station, self.outbox, self.command, self.metrics, self.started_at)
        except ValueError as exc:
            raise StartupError(f"mqtt: {exc}") from exc
        self._opened.append(self.publisher)
        self.cameras = []
        for cam_cfg in cfg.cameras:
            try:
                cam = make_camera(cam_cfg)
            except CameraError as exc:
                raise StartupError(f"camera {cam_cfg.id}: {exc}") from exc
            self.metrics.set("camera_connected", 0, camera=cam.id)
            self.metrics.inc("camera_reconnects_total", 0, camera=cam.id)
            self.metrics.inc("frames_total", 0, camera=cam.id)
            self.cameras.append(CameraWorker(self, cam))
        self.recovered = self._recover_triggers()
        for c in self.cameras:
            c.cam.seq = self.db.last_seq(c.cam.id)  # keys stay unique across restarts and crashes
        self.worker = threading.Thread(target=self.guarded("inspect", self._inspect_loop), name="inspect", daemon=True)
        self._housekeeping_stop = threading.Event()
        self.housekeeping = threading.Thread(
            target=self.guarded("housekeeping", self._housekeeping_loop), name="housekeeping", daemon=True
        )
        self.metrics_server = None
        if cfg.metrics.enabled:
            try:
                self.metrics_server = MetricsServer(self.metrics, cfg.metrics.bind_address, cfg.metrics.port)
            except OSError as exc:
                raise StartupError(
                    f"metrics: cannot listen on {cfg.metrics.bind_address}:{cfg.metrics.port}: {exc}"
                ) from exc
            self._opened.append(self.metrics_server)
        if cfg.web.enabled:
            self._open_web()

    def _open_web(self) -> None:
        """The station page. One that cannot start is a degraded reason, never a stopped line."""
        try:
            from edge_app.web import WebError, WebServer
        except ImportError as exc:
            self.web_error = f"the page's packages are missing ({exc}): pip install lineinspect"
            log.error("station page: %s", self.web_error)
            return
        try:
            self.web = WebServer(self, self.cfg.web)
        except WebError as exc:
            self.web_error = str(exc)
            log.error("station page not served (inspection goes on): %s", exc)
            return
        self._opened.append(self.web)

    def _close_opened(self) -> None:
        for part in reversed(self._opened):
            with contextlib.suppress(Exception):
                if isinstance(part, (Publisher, Archive, MetricsServer)) or part is self.web:
                    part.stop()
                else:
                    part.close()
        self._opened.clear()

    def _recover_triggers(self) -> int:
        """Triggers grabbed before a crash that never got a verdict: not_inspected (service_restart), in order."""
        try:
            pending = self.db.pending_triggers()
        except StoreError as exc:
            raise StartupError(f"storage: {exc}") from exc
        for t in pending:
            frame = Frame(t.camera_id, t.seq, t.part_id, t.t_grab, detail=t.detail)
            detail = (
                f"grabbed at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t.t_grab))} but the service stopped "
                "before deciding (crash or kill); the part was not inspected"
            )
            self.sink(self.inspector.decide(frame, NotInspected("service_restart", detail)))
        if pending:
            log.warning("%d trigger(s) from before the restart had no verdict: sent as not_inspected", len(pending))
        return len(pending)

    def guarded(self, name: str, fn):
        """A thread body that never dies silently: an exception is logged, counted and makes the
        service degraded with a restart (the watchdog stops)."""

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.dead_threads[name] = f"{type(exc).__name__}: {exc}"
                self.metrics.inc("thread_errors_total", thread=name)
                log.exception("thread %s died; the service is degraded and will be restarted", name)

        return run

    # --- frames and verdicts --------------------------------------------------------------
    def submit(self, f: Frame, wait: bool = False) -> None:
        self.metrics.inc("frames_total", camera=f.camera_id)
        try:
            self.db.record_trigger(f.camera_id, f.seq, f.part_id, f.t_grab, f.detail)
        except StoreError as exc:
            self.metrics.inc("triggers_unrecorded_total")
            if isinstance(exc, StoreUnavailableError):
                self.outbox.report_failure(exc)
        try:
            if wait:
                while True:
                    try:
                        self.queue.put(f, timeout=0.2)
                        break
                    except queue.Full:
                        if self.stop_capture.is_set():
                            raise
            else:
                self.queue.put_nowait(f)
        except queue.Full:
            detail = f"queue of {self.queue.maxsize} frames full"
            self.sink(self.inspector.decide(f, NotInspected("queue_overrun", detail)))
        self.metrics.set("queue_depth", self.queue.qsize())

    def _inspect_loop(self) -> None:
        deadline = self.cfg.decision.deadline_ms
        while True:
            self.worker_heartbeat = time.monotonic()
            try:
                f = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop_capture.is_set() and all(not c.thread.is_alive() for c in self.cameras):
                    break
                continue
            t_deq = time.monotonic()
            self.room.set()
            self.metrics.set("queue_depth", self.queue.qsize())
            cal = self.inspector.calibration  # one calibration per frame, for its regions and its verdict
            if self.paused.is_set():
                outcome = NotInspected("paused", "inspection paused by command")
            elif deadline and (t_deq - f.t_mono) * 1000 > deadline:
                outcome = NotInspected("late", f"waited {(t_deq - f.t_mono) * 1000:.0f} ms in the queue")
            else:
                outcome = self.inspector.inspect(f, t_deq, cal)
            self.sink(self.inspector.decide(f, outcome, deadline, cal))

    def sink(self, v: Verdict) -> None:
        """Count, log to the outbox (before publishing), archive, wake the publisher."""
        m = self.metrics
        m.inc("verdicts_total", verdict=v.verdict)
        if v.verdict == "not_inspected":
            m.inc("not_inspected_total", reason=v.reason or "unknown")
        for stage, ms in v.latency_ms.items():
            if stage != "total":
                m.observe("stage_latency_ms", ms, stage=stage)
        m.observe("total_latency_ms", v.latency_ms["total"])
        with self._sink_lock:
            self.counts[v.verdict] += 1
            # the log keeps no pixels: the image and map go to the archive only
            self.outbox.add(dataclasses.replace(v, image=None, amap=None))
        m.set("store_unstored", self.outbox.waiting())
        self._archive(v)
        self.publisher.notify()
        with contextlib.suppress(Exception):  # the page's view may never cost a verdict
            self.board.record(v)

    def _archive(self, v: Verdict) -> None:
        keep = self.cfg.storage.keep
        want = (v.verdict == "ng" and keep.ng) or (v.verdict == "not_inspected" and keep.not_inspected)
        if v.verdict == "ok" and keep.ok_every:
            self.ok_counter += 1
            want = self.ok_counter % keep.ok_every == 0
        if want and v.image is not None and not self.archive.submit(v):
            self.metrics.inc("archive_dropped_total")

    # --- commands, calibration ---------------------------------------------------------------
    def camera_state(self, cam_id: str, state: str) -> None:
        if self.cam_states.get(cam_id) != state:
            self.cam_states[cam_id] = state
            self.publisher.publish_status(cameras=dict(self.cam_states))

    def finished_camera(self, cam_id: str) -> None:
        self.finished.add(cam_id)

    def reload_calibration(self) -> dict:
        try:
            cal = load_calibration(self.cfg.calibration.file, self.runtime.model_sha256)
            self.inspector.set_calibration(cal)
        except (CalibrationError, ValueError) as exc:
            log.error("calibration reload refused, keeping %s: %s", self.inspector.calibration.id, exc)
            return {"ok": False, "error": str(exc), "calibration_id": self.inspector.calibration.id}
        log.info("calibration reloaded: %s (image threshold %.4f)", cal.id, cal.image_threshold)
        self.publisher.publish_status(calibration_id=cal.id)
        return {"ok": True, "calibration_id": cal.id}

    def _camera(self, payload: dict) -> CameraWorker:
        cam_id = payload.get("camera")
        if cam_id is None:
            if len(self.cameras) != 1:
                msg = f'several cameras: say which one with "camera" ({", ".join(c.cam.id for c in self.cameras)})'
                raise ValueError(msg)
            return self.cameras[0]
        for c in self.cameras:
            if c.cam.id == cam_id:
                return c
        msg = f"unknown camera {cam_id!r}"
        raise ValueError(msg)

    def command(self, name: str, payload: dict) -> dict:
        if name == "reload_calibration":
            return self.reload_calibration()
        if name == "pause":
            self.paused.set()
            self.publisher.publish_status(paused=True)
            return {"ok": True, "paused": True}
        if name == "resume":
            self.paused.clear()
            self.publisher.publish_status(paused=False)
            return {"ok": True, "paused": False}
        part_id = payload.get("part_id")
        if part_id is not None and (not isinstance(part_id, (str, int)) or isinstance(part_id, bool)):
            msg = "part_id must be a string or an integer"
            raise ValueError(msg)
        worker = self._camera(payload)
        if name == "part_id":
            if part_id is None:
                msg = 'part_id command needs "part_id"'
                raise ValueError(msg)
            worker.push_part_id(str(part_id))
            return {"ok": True}
        if name == "trigger":
            if not worker.cam.trigger(str(part_id) if part_id is not None else None):
                msg = f"camera {worker.cam.id} has no software trigger (trigger.mode must be software)"
                raise ValueError(msg)
            return {"ok": True}
        msg = f"unknown command {name!r}"
        raise ValueError(msg)

    # --- lifecycle ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "verdicts": dict(self.counts),
            "queue_depth": self.queue.qsize(),
            "outbox_backlog": self.outbox.backlog(),
            "unstored": self.outbox.waiting(),
            "rejected": len(self.outbox.rejected),
            "recovered_after_restart": self.recovered,
            "paused": self.paused.is_set(),
            "health": {"state": self.health.state, "reasons": list(self.health.reasons)},
            "archive": self.archive.stats(),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def start(self) -> None:
        self.runtime.warmup(self.cfg.model.warmup_runs)
        self.publisher.publish_status(
            state="online",
            reasons=[],
            model_sha256=self.runtime.model_sha256,
            calibration_id=self.inspector.calibration.id,
            backend=self.runtime.name,
            started_at=round(self.started_at, 3),
            paused=False,
            cameras={},
        )
        self.archive.start()
        self.publisher.start()
        if self.metrics_server:
            self.metrics_server.start()
        if self.web is not None:
            self.web.start()
            log.info("station page on %s", self.web.url)
        self.worker.start()
        for c in self.cameras:
            c.thread.start()
        self.housekeeping.start()
        self.notifier.ready(f"inspecting with {self.runtime.describe()}")
        log.info(
            "station %s/%s ready: %s, calibration %s",
            self.cfg.station.line,
            self.cfg.station.station,
            self.runtime.describe(),
            self.inspector.calibration.id,
        )

    def observe(self) -> Observation:
        """What the service sees now, for ``edge_app.health.assess``."""
        pub = self.publisher
        beats = {"inspect": self.worker_heartbeat} if self.worker.is_alive() else {}
        if pub.thread.is_alive():
            beats["mqtt-publisher"] = pub.heartbeat
        beats |= {c.thread.name: c.heartbeat for c in self.cameras if c.thread.is_alive()}
        dead = dict(self.dead_threads)
        expected = [self.worker, pub.thread, self.archive.thread]
        for t in expected:
            if t.ident is not None and not t.is_alive() and not self.stop_capture.is_set() and t.name not in dead:
                dead[t.name] = "ended"
        outbox = self.outbox
        return Observation(
            now=time.monotonic(),
            heartbeats=beats,
            dead_threads=dead,
            mqtt_connected=pub.connected,
            mqtt_error=pub.last_error,
            backlog=outbox.backlog(),
            last_delivery=pub.last_delivery,
            store_error=outbox.store_error,
            store_error_since=outbox.store_error_since,
            undelivered_in_memory=outbox.undelivered_waiting(),
            cameras={k: v for k, v in self.cam_states.items() if not self.stop_capture.is_set()},
            web_error=self.web_error or (self.web.failed if self.web is not None else None),
        )

    def check_health(self) -> Health:
        """Assess, then tell every health signal the same thing (metrics, retained status, STATUS=, watchdog)."""
        obs = self.observe()
        health = assess(obs, self.limits)
        m = self.metrics
        m.set("outbox_backlog", obs.backlog)
        m.set("store_unstored", self.outbox.waiting())
        m.set("health_degraded", 0 if health.ok else 1)
        m.set("watchdog_withheld", 1 if health.restart else 0)
        for reason in self.health.reasons:
            if reason not in health.reasons:
                m.set("health_reason", 0, reason=reason)
        for reason in health.reasons:
            m.set("health_reason", 1, reason=reason)
        if health != self.health:
            if health.ok:
                log.info("healthy again")
            else:
                log.warning(
                    "degraded: %s%s", "; ".join(health.reasons), " (watchdog withheld)" if health.restart else ""
                )
            self.publisher.publish_status(state="online" if health.ok else "degraded", reasons=list(health.reasons))
        self.health = health
        if not health.restart:
            self.notifier.watchdog()
        self.notifier.status(
            f"{health.state.upper()}: {sum(self.counts.values())} verdicts, backlog {obs.backlog}"
            + ("" if health.ok else " - " + "; ".join(health.reasons))
            + (", PAUSED" if self.paused.is_set() else "")
        )
        return health

    def run_forever(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload_calibration).start())
        self.start()
        while not self.stop_event.wait(0.5):
            pass
        return self.shutdown()

    def _housekeeping_loop(self) -> None:
        """Retries of unstored verdicts, health (watchdog, STATUS=, status topic, metrics), stats, retention."""
        wd = self.notifier.watchdog_s
        tick = min(wd / 3, 1.0) if wd else 1.0
        next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
        next_purge = time.monotonic()
        while not self._housekeeping_stop.wait(tick):
            with self._sink_lock:
                self.outbox.flush()
            self.check_health()
            if time.monotonic() >= next_stats:
                self.publisher.publish_stats(self.stats())
                next_stats = time.monotonic() + self.cfg.mqtt.stats_interval_s
            if self.cfg.storage.retention_days and time.monotonic() >= next_purge:
                with contextlib.suppress(StoreError):
                    self.db.purge_delivered_before(time.time() - self.cfg.storage.retention_days * 86400)
                next_purge = time.monotonic() + 3600

    def shutdown(self, drain_timeout_s: float = 10.0) -> int:
        log.info("stopping: draining in-flight frames")
        self.notifier.stopping()
        if self.web is not None:  # the page first: it only reads, and must not see half-closed parts
            with contextlib.suppress(Exception):
                self.web.stop()
            self._opened.remove(self.web)
        self.stop_capture.set()
        # threads that never started (a service stopped before or during start()) are not joined
        for c in self.cameras:
            if c.thread.ident is not None:
                c.thread.join(10)
        if self.worker.ident is not None:
            self.worker.join(30)
        publishing = self.publisher.thread.ident is not None
        delivered = self.publisher.drain(drain_timeout_s) if publishing else True
        self._housekeeping_stop.set()
        if self.housekeeping.is_alive():
            self.housekeeping.join(5)
        with self._sink_lock:
            self.outbox.flush()
        if self.outbox.waiting():
            log.error(
                "%d verdict(s) could not be written to the decision log before stopping (%s)",
                self.outbox.waiting(),
                self.outbox.store_error,
            )
        if not delivered:
            log.warning(
                "%d verdict(s) not yet acknowledged: they stay in the outbox for the next start", self.outbox.backlog()
            )
        self._close_opened()
        self.notifier.close()
        return 0


def main_run(args) -> int:
    try:
        cfg = load_config(Path(args.config))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    logging.getLogger().setLevel(cfg.logging.level)
    try:
        svc = Service(cfg, Path(args.config))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return svc.run_forever()

"""Health from real progress: a pure function of what the service observed, so it can be tested alone.

``assess`` returns the state the watchdog, ``STATUS=``, the retained status topic and ``/metrics``
all report: ``ok``, or ``degraded`` with its reasons; and whether the watchdog must be withheld so
that systemd restarts the service (``restart``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HealthLimits:
    heartbeat_max_age_s: float = 10.0  # a thread whose loop has not turned for this long is stuck
    stall_s: float = 30.0  # connected, verdicts waiting, no ack for this long: delivery is stuck
    restart_after_s: float = 60.0  # ... this long stuck: withhold the watchdog
    store_restart_after_s: float | None = 600.0  # log unwritable this long, nothing only in memory: restart


@dataclass(frozen=True)
class Observation:
    """What the service saw at one moment (monotonic seconds)."""

    now: float
    heartbeats: dict[str, float] = field(default_factory=dict)  # thread -> last loop turn
    dead_threads: dict[str, str] = field(default_factory=dict)  # thread -> why it ended
    mqtt_connected: bool = True
    mqtt_error: str | None = None
    backlog: int = 0
    last_delivery: float = 0.0
    store_error: str | None = None
    store_error_since: float | None = None
    undelivered_in_memory: int = 0  # verdicts neither logged nor acknowledged: a restart would lose them
    cameras: dict[str, str] = field(default_factory=dict)  # camera -> state text
    web_error: str | None = None  # the station page is not served (the line is unaffected: no restart)


@dataclass(frozen=True)
class Health:
    state: str  # ok | degraded
    reasons: tuple[str, ...] = ()
    restart: bool = False  # withhold WATCHDOG=1: systemd restarts the service

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def assess(o: Observation, limits: HealthLimits) -> Health:
    reasons: list[str] = []
    restart = False
    for name, why in sorted(o.dead_threads.items()):
        reasons.append(f"thread {name} died: {why}")
        restart = True
    for name, beat in sorted(o.heartbeats.items()):
        age = o.now - beat
        if age > limits.heartbeat_max_age_s:
            reasons.append(f"thread {name} stuck for {age:.0f} s")
            restart = True
    if not o.mqtt_connected:
        reasons.append(f"MQTT disconnected ({o.mqtt_error or 'reconnecting'}); {o.backlog} verdict(s) wait")
    elif o.backlog > 0:
        stuck = o.now - o.last_delivery
        if stuck > limits.stall_s:
            reasons.append(f"delivery stuck: {o.backlog} verdict(s) waiting, no broker ack for {stuck:.0f} s")
            restart = restart or stuck > limits.restart_after_s
    if o.store_error is not None:
        reasons.append(f"decision log not writable: {o.store_error}")
        since = o.store_error_since if o.store_error_since is not None else o.now
        if (
            limits.store_restart_after_s is not None
            and o.now - since > limits.store_restart_after_s
            and o.undelivered_in_memory == 0
        ):
            restart = True
    for cam, state in sorted(o.cameras.items()):
        if state not in ("connected", "finished"):
            reasons.append(f"camera {cam}: {state}")
    if o.web_error is not None:
        reasons.append(f"station page not served: {o.web_error}")
    return Health("degraded" if reasons else "ok", tuple(reasons), restart)

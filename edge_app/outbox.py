"""The outbox: every verdict on its way to the PLC, durable in the decision log when the disk allows.

A verdict is logged (SQLite) before it is published and marked delivered on the broker's ack. When
the log cannot be written (disk full, read-only, failing), verdicts wait here in memory, in order,
and are PUBLISHED FROM MEMORY all the same: a reject gate needs the verdict now, and a full disk
must not stop delivery. They are written to the log as soon as it takes writes again, carrying
their delivery state. Failures are of two kinds:

- transient (``StoreUnavailableError``): the write is retried, oldest first, and the outbox reports
  the error (``store_error``) until a write succeeds;
- permanent (``DuplicateVerdictError``): the verdict is logged as an error, counted, set aside in
  ``rejected`` and never blocks the verdicts behind it.

Marking a row published or delivered on a full disk is remembered and retried the same way.
Nothing here raises into the publisher's or paho's threads.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

from edge_app.frame import Verdict
from edge_app.store import DecisionLog, DuplicateVerdictError, Row, StoreUnavailableError

log = logging.getLogger(__name__)


@dataclass
class _Unstored:
    verdict: Verdict
    created_at: float
    published_at: float | None = None
    delivered_at: float | None = None
    attempts: int = 0
    stored: bool = False


def _row(u: _Unstored) -> Row:
    v = u.verdict
    return Row(
        id=None,  # not in the log yet
        key=v.key,
        station=v.station,
        camera_id=v.camera_id,
        seq=v.seq,
        part_id=v.part_id,
        verdict=v.verdict,
        reason=v.reason,
        score=v.score,
        threshold=v.threshold,
        regions=json.loads(json.dumps(v.regions)),
        latency=dict(v.latency_ms),
        model_sha=v.model_sha,
        calibration_id=v.calibration_id,
        detail=v.detail,
        t_grab=v.t_grab,
        t_decided=v.t_decided,
        created_at=u.created_at,
        published_at=u.published_at,
        delivered_at=u.delivered_at,
        attempts=u.attempts,
    )


class Outbox:
    # at most this many verdicts wait in memory for the log; past it the oldest ones the broker has
    # already acknowledged are dropped from memory (the PLC has them; only their log row is lost,
    # counted in unlogged_delivered_total). Undelivered verdicts are never dropped.
    MAX_WAITING = 100_000

    def __init__(self, db: DecisionLog, metrics=None, max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self.unlogged_delivered = 0
        self.db = db
        self.metrics = metrics
        self.lock = threading.RLock()
        self.unstored: collections.deque[_Unstored] = collections.deque()  # oldest first
        self._by_key: dict[str, _Unstored] = {}  # the first waiting verdict of each key
        self.rejected: list[tuple[Verdict, str]] = []  # permanent failures, kept aside
        self._marks: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.store_error: str | None = None  # the last transient failure, None once a write succeeds
        self.store_error_since: float | None = None
        self._last_backlog = 0

    # --- writing ---------------------------------------------------------------------------
    def add(self, v: Verdict) -> bool:
        """Log ``v`` (after any verdict still waiting); True when it is durable now."""
        with self.lock:
            u = _Unstored(v, time.time())
            self.unstored.append(u)
            self._by_key.setdefault(v.key, u)
            self.flush()
            if len(self.unstored) > self.max_waiting:
                self._drop_delivered(len(self.unstored) - self.max_waiting)
            return u.stored

    def _drop_delivered(self, n: int) -> None:
        keep: collections.deque[_Unstored] = collections.deque()
        dropped = 0
        for u in self.unstored:
            if dropped < n and u.delivered_at is not None:
                dropped += 1
                if self._by_key.get(u.verdict.key) is u:
                    del self._by_key[u.verdict.key]
            else:
                keep.append(u)
        self.unstored = keep
        if dropped:
            self.unlogged_delivered += dropped
            log.error(
                "%d delivered verdict(s) dropped from memory without a log row: the log is still not writable", dropped
            )
            if self.metrics:
                self.metrics.inc("unlogged_delivered_total", dropped)

    def flush(self) -> None:
        """Write waiting verdicts and delivery marks, oldest first, until the log refuses one."""
        with self.lock:
            while self.unstored:
                u = self.unstored[0]
                try:
                    self.db.insert(u.verdict, u.published_at, u.delivered_at, u.attempts)
                    u.stored = True
                except DuplicateVerdictError as exc:
                    self._reject(u.verdict, str(exc))
                except StoreUnavailableError as exc:
                    self._failed(exc)
                    return
                self.unstored.popleft()
                if self._by_key.get(u.verdict.key) is u:
                    del self._by_key[u.verdict.key]
                self._ok()
            while self._marks:
                key, (what, t) = next(iter(self._marks.items()))
                try:
                    (self.db.mark_delivered if what == "delivered" else self.db.mark_published)(key, t)
                except StoreUnavailableError as exc:
                    self._failed(exc)
                    return
                self._marks.pop(key, None)
                self._ok()

    def _reject(self, v: Verdict, why: str) -> None:
        self.rejected.append((v, why))
        del self.rejected[:-1000]
        log.error("verdict %s set aside, it can never be logged: %s", v.key, why)
        if self.metrics:
            self.metrics.inc("store_rejected_total")

    def report_failure(self, exc: StoreUnavailableError) -> None:
        """A failed write elsewhere (a trigger record) counts as the log being unwritable too."""
        self._failed(exc)

    def _failed(self, exc: StoreUnavailableError) -> None:
        if self.store_error is None:
            self.store_error_since = time.monotonic()
            log.error("%s: verdicts wait in memory and are still published", exc)
        self.store_error = str(exc)
        if self.metrics:
            self.metrics.inc("store_errors_total")

    def _ok(self) -> None:
        if self.store_error is not None:
            log.info("decision log writable again: %d verdict(s) still waiting", len(self.unstored))
        self.store_error = None
        self.store_error_since = None

    # --- the publisher's side --------------------------------------------------------------
    def pending(self, after_id: int, limit: int, skip: set[str]) -> list[Row]:
        """Undelivered verdicts oldest first: logged rows with id > ``after_id``, then the unstored ones.
        ``skip``: keys already handed to the current connection."""
        rows: list[Row] = []
        try:
            rows = [r for r in self.db.pending(after_id, limit + len(skip)) if r.key not in skip][:limit]
        except StoreUnavailableError as exc:
            self._failed(exc)
        if len(rows) < limit:
            with self.lock:
                waiting = [u for u in self.unstored if u.delivered_at is None and u.verdict.key not in skip]
                rows += [_row(u) for u in waiting[: limit - len(rows)]]
        return rows

    def mark_published(self, key: str, t: float) -> None:
        with self.lock:
            u = self._by_key.get(key)
            if u is not None:
                u.published_at, u.attempts = t, u.attempts + 1
                return
            if key in self._marks:
                return  # a delivered mark waiting is newer news
        try:
            self.db.mark_published(key, t)
        except StoreUnavailableError as exc:
            with self.lock:
                self._marks.setdefault(key, ("published", t))
            self._failed(exc)

    def mark_delivered(self, key: str, t: float) -> None:
        with self.lock:
            u = self._by_key.get(key)
            if u is not None:
                u.delivered_at = t
                return
        try:
            self.db.mark_delivered(key, t)
        except StoreUnavailableError as exc:
            with self.lock:
                self._marks[key] = ("delivered", t)
            self._failed(exc)

    def backlog(self) -> int:
        """Verdicts not yet acknowledged by the broker, logged or waiting in memory."""
        try:
            logged = self.db.backlog()
            self._last_backlog = logged
        except StoreUnavailableError:
            logged = self._last_backlog
        with self.lock:
            waiting = sum(1 for u in self.unstored if u.delivered_at is None)
            acked_unmarked = sum(1 for what, _ in self._marks.values() if what == "delivered")
        return max(logged - acked_unmarked, 0) + waiting

    def undelivered_waiting(self) -> int:
        """Verdicts neither logged nor acknowledged: a restart now would lose them."""
        with self.lock:
            return sum(1 for u in self.unstored if u.delivered_at is None)

    def waiting(self) -> int:
        """Verdicts not yet durable (in memory only)."""
        with self.lock:
            return len(self.unstored)

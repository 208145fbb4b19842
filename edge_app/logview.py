"""Read-only queries on the decision log for the station page: history search, CSV, recent scores,
reviews, audit.

It has its own read-only SQLite connection: a long search or a CSV export never holds the lock
the line writes verdicts under (WAL lets readers and the writer work side by side).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_app.store import DecisionLog, Row, StoreUnavailableError

VERDICTS = ("ok", "ng", "not_inspected")
CSV_COLUMNS = (
    "id",
    "key",
    "station",
    "camera_id",
    "seq",
    "part_id",
    "verdict",
    "reason",
    "score",
    "threshold",
    "regions",
    "calibration_id",
    "t_grab",
    "t_decided",
    "decided_utc",
    "delivered_at",
    "review",
)


class QueryError(ValueError):
    """A search the page cannot run; the message says which field and why."""


@dataclass(frozen=True)
class Query:
    part_id: str = ""
    t_from: float | None = None
    t_to: float | None = None
    verdict: str | None = None
    page: int = 1
    per_page: int = 50

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise QueryError(f"verdict must be one of {', '.join(VERDICTS)} (got {self.verdict!r})")
        if self.page < 1:
            raise QueryError("page must be 1 or more")
        if not 1 <= self.per_page <= 500:
            raise QueryError("per_page must be between 1 and 500")
        if self.t_from is not None and self.t_to is not None and self.t_from > self.t_to:
            raise QueryError("the time range ends before it starts")
        if len(self.part_id) > 200:
            raise QueryError("part id search is limited to 200 characters")


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int
    query: Query
    reviews: dict[str, str]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))


@dataclass(frozen=True)
class Scored:
    """A logged part as the what-if and the histogram see it."""

    key: str
    score: float
    verdict: str
    has_region: bool
    review: str | None


@dataclass(frozen=True)
class AuditRow:
    id: int
    t: float
    user: str
    remote: str
    action: str
    detail: dict
    outcome: str


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def csv_cell(value) -> str:
    """A cell a spreadsheet will not run as a formula (OWASP: prefix =, +, -, @, tab, CR with ')."""
    text = "" if value is None else str(value)
    if text and text[0] in "=+-@\t\r" and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class LogView:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None, timeout=2
            )
            self.db.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the decision log {self.path} for reading: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self.db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailableError(f"cannot read the decision log {self.path}: {exc}") from exc

    @staticmethod
    def _where(q: Query) -> tuple[str, tuple]:
        clauses, args = [], []
        if q.part_id:
            clauses.append("part_id LIKE ? ESCAPE '\\'")
            args.append(_like(q.part_id))
        if q.t_from is not None:
            clauses.append("t_decided >= ?")
            args.append(q.t_from)
        if q.t_to is not None:
            clauses.append("t_decided <= ?")
            args.append(q.t_to)
        if q.verdict:
            clauses.append("verdict = ?")
            args.append(q.verdict)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)

    def search(self, q: Query) -> Page:
        where, args = self._where(q)
        total = int(self._all(f"SELECT COUNT(*) FROM verdicts{where}", args)[0][0])
        rows = [
            DecisionLog._row(r)
            for r in self._all(
                f"SELECT * FROM verdicts{where} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*args, q.per_page, (q.page - 1) * q.per_page),
            )
        ]
        return Page(rows, total, q, self.reviews_for([r.key for r in rows]))

    def get(self, row_id: int) -> Row | None:
        rows = self._all("SELECT * FROM verdicts WHERE id = ?", (row_id,))
        return DecisionLog._row(rows[0]) if rows else None

    def reviews_for(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        return dict(self._all(f"SELECT key, label FROM reviews WHERE key IN ({marks})", tuple(keys)))

    def csv_chunks(self, q: Query, chunk: int = 500) -> Iterator[str]:
        """The whole search result as CSV (oldest first), a few hundred rows at a time."""
        where, args = self._where(q)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        last = 0
        joiner = " AND " if where else " WHERE "
        while True:
            rows = self._all(
                "SELECT v.*, r.label FROM verdicts v LEFT JOIN reviews r ON r.key = v.key"
                f"{where}{joiner}v.id > ? ORDER BY v.id LIMIT ?",
                (*args, last, chunk),
            )
            for r in rows:
                row = DecisionLog._row(r[:-1])
                w.writerow(
                    [
                        csv_cell(x)
                        for x in (
                            row.id,
                            row.key,
                            row.station,
                            row.camera_id,
                            row.seq,
                            row.part_id,
                            row.verdict,
                            row.reason,
                            row.score,
                            row.threshold,
                            len(row.regions),
                            row.calibration_id,
                            row.t_grab,
                            row.t_decided,
                            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(row.t_decided))
                            + f".{int((row.t_decided % 1) * 1000):03d}Z",
                            row.delivered_at,
                            r[-1],
                        )
                    ]
                )
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
            if len(rows) < chunk:
                return
            last = rows[-1][0]

    def recent_scored(self, n: int) -> list[Scored]:
        """The last ``n`` inspected parts (they have a score), newest last, with any review mark."""
        rows = self._all(
            "SELECT v.key, v.score, v.verdict, v.regions, r.label FROM verdicts v LEFT JOIN reviews r ON r.key = v.key"
            " WHERE v.score IS NOT NULL ORDER BY v.id DESC LIMIT ?",
            (n,),
        )
        return [Scored(k, float(s), vd, bool(json.loads(reg)), lab) for k, s, vd, reg, lab in reversed(rows)]

    def reviewed(self) -> list[Scored]:
        """Every part an operator marked (false reject or confirmed defect)."""
        rows = self._all(
            "SELECT v.key, v.score, v.verdict, v.regions, r.label FROM reviews r JOIN verdicts v ON v.key = r.key"
            " WHERE v.score IS NOT NULL ORDER BY r.t"
        )
        return [Scored(k, float(s), vd, bool(json.loads(reg)), lab) for k, s, vd, reg, lab in rows]

    def audit(self, limit: int = 100) -> list[AuditRow]:
        rows = self._all(
            "SELECT id, t, user, remote, action, detail, outcome FROM audit ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [AuditRow(i, t, u, rm, a, json.loads(d), o) for i, t, u, rm, a, d, o in rows]

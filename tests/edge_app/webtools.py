"""Helpers for the station-page tests: a running service with its page, and a small HTTP client
with a cookie jar (real HTTP over loopback, no test client)."""

from __future__ import annotations

import http.cookiejar
import json
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edge_app.web.auth import hash_password

PASSWORD = "correct horse battery"


def users_file(tmp: Path, name: str = "alice", password: str = PASSWORD) -> Path:
    p = tmp / "web_users"
    p.write_text(f"# station page users\n{name}:{hash_password(password)}\n")
    return p


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Client:
    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(self, method: str, path: str, data: dict | None = None, headers: dict | None = None) -> Reply:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        if body is not None and "Content-Type" not in (headers or {}):
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=20) as r:
                return Reply(r.status, r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read(), e.headers)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, data: dict, headers: dict | None = None) -> Reply:
        return self.request("POST", path, data, headers)

    def login(self, user: str = "alice", password: str = PASSWORD) -> Reply:
        return self.post("/login", {"user": user, "password": password, "next": "/"})

    def csrf(self, path: str = "/") -> str:
        m = re.search(r'name="csrf-token" content="([^"]*)"', self.get(path).text)
        assert m, "page has no csrf meta tag"
        return m.group(1)


def log_rows(db: Path) -> list[dict]:
    """The decision log read straight from SQLite (independent of the page's code)."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM verdicts ORDER BY id")]
    finally:
        con.close()


def query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()

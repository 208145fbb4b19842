"""Who may change the station from the page: users from a file, scrypt hashes, sessions with CSRF tokens.

The users file holds ``name:secret`` lines; ``secret`` is ``scrypt$N$r$p$salt$hash`` (written by
``lineinspect web-password``) or, discouraged, the password itself. Either way the typed password
is hashed and the hashes compared in constant time. Sessions live in memory (a restart logs
everyone out); each has its own CSRF token that every change must send back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge_app.config import WebAuthConfig, secret_path

SCRYPT = (2**14, 8, 1)
COOKIE = "lineinspect_session"


class AuthError(ValueError):
    """A login or a change that is refused; the message says why (never which half was wrong)."""


def hash_password(password: str, salt: bytes | None = None, params: tuple[int, int, int] = SCRYPT) -> str:
    if not password:
        msg = "the password is empty"
        raise ValueError(msg)
    salt = salt or os.urandom(16)
    n, r, p = params
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, secret: str) -> bool:
    """Constant-time check of a typed password against a stored hash (or a stored plain password)."""
    if secret.startswith("scrypt$"):
        try:
            _, n, r, p, salt, want = secret.split("$")
            params = (int(n), int(r), int(p))
            expected = bytes.fromhex(want)
            salt_b = bytes.fromhex(salt)
        except ValueError:
            return False
        got = hashlib.scrypt(password.encode(), salt=salt_b, n=params[0], r=params[1], p=params[2], dklen=len(expected))
        return hmac.compare_digest(got, expected)
    # a plain stored password: hash both with one fresh salt, compare the hashes
    salt_b = os.urandom(16)
    a = hashlib.scrypt(password.encode(), salt=salt_b, n=2**12, r=8, p=1, dklen=32)
    b = hashlib.scrypt(secret.encode(), salt=salt_b, n=2**12, r=8, p=1, dklen=32)
    return hmac.compare_digest(a, b)


def users_path(cfg: WebAuthConfig) -> Path | None:
    return secret_path(cfg.users_file, cfg.users_credential, "web.auth.users_credential")


def load_users(cfg: WebAuthConfig) -> dict[str, str]:
    """name -> secret. ValueError with the file and line for a file that cannot be used."""
    path = users_path(cfg)
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        msg = f"cannot read the page's users file {path}: {exc.strerror or exc}"
        raise ValueError(msg) from exc
    users: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name.strip() or not secret:
            msg = f"{path} line {i}: expected 'name:secret' (make one with 'lineinspect web-password NAME')"
            raise ValueError(msg)
        users[name.strip()] = secret
    if not users:
        msg = f"{path} names no user: add a 'name:secret' line (lineinspect web-password NAME)"
        raise ValueError(msg)
    return users


@dataclass(frozen=True)
class Session:
    token: str
    user: str
    csrf: str
    expires: float


class Sessions:
    """Logins in memory, and a lockout for addresses that keep guessing."""

    def __init__(self, cfg: WebAuthConfig, users: dict[str, str]):
        self.cfg = cfg
        self.users = users
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # remote -> (count, time of the last)

    def login(self, user: str, password: str, remote: str) -> Session:
        if not self.users:
            msg = "no user may change this station: set web.auth.users_file in the station's config"
            raise AuthError(msg)
        now = time.time()
        with self._lock:
            count, last = self._failures.get(remote, (0, 0.0))
            if count >= self.cfg.max_failures and now - last < self.cfg.lockout_s:
                msg = f"too many wrong passwords from {remote}: try again in {self.cfg.lockout_s - (now - last):.0f} s"
                raise AuthError(msg)
        secret = self.users.get(user)
        # hash even for an unknown user so that timing does not tell which names exist
        ok = check_password(password, secret if secret is not None else "scrypt$16384$8$1$00$00")
        if not ok or secret is None:
            with self._lock:
                count, _ = self._failures.get(remote, (0, 0.0))
                self._failures[remote] = (count + 1, now)
            msg = "wrong user name or password"
            raise AuthError(msg)
        with self._lock:
            self._failures.pop(remote, None)
            s = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now + self.cfg.session_hours * 3600)
            self._sessions[s.token] = s
            return s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._sessions.get(token)
            if s is not None and s.expires < time.time():
                del self._sessions[token]
                return None
            return s

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())


def main_web_password(args) -> int:
    """``lineinspect web-password NAME``: read a password, print the users-file line with its hash."""
    import getpass
    import sys

    if sys.stdin.isatty():
        pw = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != pw:
            print("error: the two passwords differ", file=sys.stderr)
            return 2
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if ":" in args.name or not args.name.strip():
        print("error: the user name must be non-empty and hold no ':'", file=sys.stderr)
        return 2
    try:
        print(f"{args.name}:{hash_password(pw)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

"""The station page, served by uvicorn in its own thread beside the line.

The page reads the service through ``edge_app.web.station.Station`` and never holds a lock the
line needs; if it fails (a port taken, a crash in its thread) the service says so in its health
reasons and goes on inspecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import TYPE_CHECKING

from edge_app.config import WebConfig

if TYPE_CHECKING:
    from edge_app.service import Service

log = logging.getLogger(__name__)


class WebError(RuntimeError):
    """The page cannot be served; the message says why. The line runs on without it."""


class WebServer:
    def __init__(self, svc: Service, cfg: WebConfig):
        import uvicorn

        from edge_app.web.app import make_app
        from edge_app.web.auth import Sessions, load_users
        from edge_app.web.station import Station

        self.cfg = cfg
        self.error: str | None = None
        try:
            users = load_users(cfg.auth)
        except ValueError as exc:
            raise WebError(str(exc)) from exc
        if cfg.tls is not None:
            for f in (cfg.tls.cert_file, cfg.tls.key_file):
                if not f.is_file():
                    raise WebError(f"web.tls: file not found: {f}")
        if cfg.bind_address not in ("127.0.0.1", "::1", "localhost") and cfg.tls is None and users:
            log.warning(
                "the station page listens on %s without TLS: logins cross the network in clear (set web.tls)",
                cfg.bind_address,
            )
        family = socket.AF_INET6 if ":" in cfg.bind_address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((cfg.bind_address, cfg.port))
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            raise WebError(f"cannot listen on {cfg.bind_address}:{cfg.port}: {exc.strerror or exc}") from exc
        self.station = Station(svc)
        self.sessions = Sessions(cfg.auth, users)
        self.app = make_app(self.station, cfg, self.sessions)
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            ssl_certfile=str(cfg.tls.cert_file) if cfg.tls else None,
            ssl_keyfile=str(cfg.tls.key_file) if cfg.tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="web", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.cfg.bind_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.cfg.tls else 'http'}://{host}:{self.port}/"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
            if not self.server.should_exit:
                self.error = "the page's server stopped"
        except BaseException as exc:  # the page may die; the line must not
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the station page stopped; inspection goes on")
        finally:
            with contextlib.suppress(Exception):
                self.loop.close()

    def start(self) -> None:
        self.thread.start()

    @property
    def failed(self) -> str | None:
        if self.error:
            return self.error
        if self.thread.ident is not None and not self.thread.is_alive() and not self.server.should_exit:
            return "the page's server thread ended"
        return None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(5)
        self.sock.close()
        self.station.close()

"""A small Prometheus text-format registry and HTTP endpoint (no extra dependency)."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class Metrics:
    def __init__(self, prefix: str = "lineinspect"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.hists: dict[tuple[str, tuple], list] = {}
        self.help: dict[str, tuple[str, str]] = {}

    def _key(self, name: str, labels: dict[str, str] | None) -> tuple[str, tuple]:
        return name, tuple(sorted((labels or {}).items()))

    def describe(self, name: str, kind: str, text: str) -> None:
        self.help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            k = self._key(name, labels)
            self.counters[k] = self.counters.get(k, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self.lock:
            self.gauges[self._key(name, labels)] = float(value)

    def observe(self, name: str, value_ms: float, **labels: str) -> None:
        with self.lock:
            k = self._key(name, labels)
            h = self.hists.setdefault(k, [[0] * len(LATENCY_BUCKETS_MS), 0, 0.0])
            for i, b in enumerate(LATENCY_BUCKETS_MS):
                if value_ms <= b:
                    h[0][i] += 1
            h[1] += 1
            h[2] += value_ms

    def get(self, name: str, **labels: str) -> float:
        with self.lock:
            k = self._key(name, labels)
            return self.counters.get(k, self.gauges.get(k, 0.0))

    def render(self) -> str:
        out: list[str] = []
        with self.lock:
            names = sorted({k[0] for k in (*self.counters, *self.gauges, *self.hists)})
            for name in names:
                full = f"{self.prefix}_{name}"
                kind, text = self.help.get(name, ("untyped", name))
                out.append(f"# HELP {full} {text}")
                out.append(f"# TYPE {full} {kind}")
                for (n, lab), v in sorted(self.counters.items()):
                    if n == name:
                        out.append(f"{full}{_labels(dict(lab))} {v:g}")
                for (n, lab), v in sorted(self.gauges.items()):
                    if n == name:
                        out.append(f"{full}{_labels(dict(lab))} {v:g}")
                for (n, lab), (buckets, count, total) in sorted(self.hists.items()):
                    if n != name:
                        continue
                    for b, c in zip(LATENCY_BUCKETS_MS, buckets, strict=True):
                        out.append(f"{full}_bucket{_labels(dict(lab) | {'le': str(b)})} {c}")
                    out.append(f"{full}_bucket{_labels(dict(lab) | {'le': '+Inf'})} {count}")
                    out.append(f"{full}_sum{_labels(dict(lab))} {total:g}")
                    out.append(f"{full}_count{_labels(dict(lab))} {count}")
        return "\n".join(out) + "\n"


class MetricsServer:
    def __init__(self, metrics: Metrics, host: str, port: int):
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():  # shutdown() waits for serve_forever: it would block forever unstarted
            self.httpd.shutdown()
        self.httpd.server_close()

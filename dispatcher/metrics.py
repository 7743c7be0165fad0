"""Prometheus metrics and the /healthz, /readyz, /metrics HTTP endpoints.

Metrics live in a registry owned by the process (built in main), never the
module-global default registry, so tests can run several dispatchers in one
interpreter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "autoreduce_runs_received", "Messages taken from the pending queue", registry=r
        )
        self.accepted = Counter("autoreduce_runs_accepted", "Runs stored as Jobs", registry=r)
        self.duplicates = Counter(
            "autoreduce_runs_duplicate", "Redelivered runs that already had a Job", registry=r
        )
        self.rejected = Counter(
            "autoreduce_runs_rejected", "Messages dead-lettered", ["reason"], registry=r
        )
        self.outcomes = Counter(
            "autoreduce_outcomes_on_behalf",
            "Outcomes the dispatcher posted for a run",
            ["kind", "reason"],
            registry=r,
        )
        self.waiting = Gauge("autoreduce_runs_waiting", "Runs waiting", ["instrument"], registry=r)
        self.running = Gauge("autoreduce_runs_running", "Runs reducing", ["instrument"], registry=r)
        self.dispatch_latency = Histogram(
            "autoreduce_dispatch_seconds",
            "Message received to Job stored",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.broker_reconnects = Gauge(
            "autoreduce_broker_reconnects", "Broker reconnects since start", registry=r
        )


HealthCheck = Callable[[], bool]


def serve(
    *, port: int, metrics: Metrics, live: HealthCheck, ready: HealthCheck
) -> ThreadingHTTPServer:
    """Start the HTTP endpoints on a daemon thread; returns the server to shut down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = live()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
            elif self.path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the log

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - probes come from the kubelet
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server

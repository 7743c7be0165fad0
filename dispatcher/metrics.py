"""Prometheus metrics and the /healthz, /readyz, /metrics HTTP endpoints.

Metrics live in a registry owned by the process (built in main), never the
module-global default registry, so tests can run several dispatchers in one
interpreter. The same property makes ``Metrics()`` the no-op default of the classes
that count: a registry nobody serves records what they count and shows it to no one,
so they count unconditionally instead of checking for a missing ``metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
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
        self.cancels = Counter(
            "autoreduce_cancel_requests", "Cancel messages taken from the pending queue", registry=r
        )
        self.dropped = Counter(
            "autoreduce_runs_cancelled_before_dispatch",
            "Runs dropped because their cancel arrived first",
            registry=r,
        )
        self.admitted = Counter(
            "autoreduce_runs_admitted", "Runs handed their RB (unsuspended)", registry=r
        )
        self.admission_latency = Histogram(
            "autoreduce_admission_seconds",
            "Job created to Job admitted (waiting for the RB and caps included)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600),
            registry=r,
        )
        self.api_reconnects = Counter(
            "autoreduce_api_reconnects", "Job watch re-established after an API failure", registry=r
        )
        self.events_dropped = Counter(
            "autoreduce_events_dropped", "Waiting Events not recorded (queue full)", registry=r
        )
        self.api_throttled_total = Counter(
            "autoreduce_api_throttled",
            "API requests the apiserver refused with 429 (each waited out and sent again)",
            registry=r,
        )
        self.api_throttled_seconds = Counter(
            "autoreduce_api_throttled_wait_seconds",
            "Seconds every request was held after a 429 (Retry-After, backoff, jitter)",
            registry=r,
        )
        self.api_client_qps = Gauge(
            "autoreduce_api_client_qps_limit",
            "Client-side API budget in requests/s; 0 while the apiserver paces us (APF)",
            registry=r,
        )
        self._gauge_lock = threading.Lock()

    def outcome_posted(self, kind: str, reason: str) -> None:
        """An outcome the dispatcher posted on a run's behalf (the runner posts the
        rest and counts nothing here)."""
        self.outcomes.labels(kind=kind, reason=reason).inc()

    # -- dispatcher.kube.PaceObserver ----------------------------------------------

    def api_throttled(self, wait_s: float) -> None:
        self.api_throttled_total.inc()
        self.api_throttled_seconds.inc(wait_s)

    def api_client_budget(self, qps: float | None) -> None:
        self.api_client_qps.set(qps or 0)

    def set_runs(self, *, waiting: Mapping[str, int], running: Mapping[str, int]) -> None:
        """Replace the waiting/running gauges (instruments at zero disappear)."""
        with self._gauge_lock:
            for gauge, counts in ((self.waiting, waiting), (self.running, running)):
                gauge.clear()
                for instrument, count in counts.items():
                    gauge.labels(instrument=instrument or "unknown").set(count)


HealthCheck = Callable[[], bool]


def serve(
    *,
    port: int,
    metrics: Metrics,
    live: HealthCheck,
    ready: HealthCheck,
    refresh: Callable[[], None] = lambda: None,
) -> ThreadingHTTPServer:
    """Start the HTTP endpoints on a daemon thread; returns the server to shut down.
    ``refresh`` runs before every scrape: it fills the gauges from live state."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                refresh()
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

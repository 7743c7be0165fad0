"""The composition root: every part of the daemon is built here, once, from settings.

Nothing is wired after construction. The parts meet through the Job and pod caches
(fed by the informers) and the one work queue (fed by the informers and the intake,
drained by the workers): intake ``dispatch`` -> Job -> admission ``admitter`` (key
RB) -> pod -> outcome ``outcomes`` (key Job).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from autoreduce_common.stomp_client import StompClient
from autoreduce_common.transport import Transport

from dispatcher.admission import Caps, is_running, is_waiting
from dispatcher.admitter import Admitter
from dispatcher.caches import JobCache, PodCache
from dispatcher.config import DispatcherSettings
from dispatcher.consumer import Consumer
from dispatcher.dispatch import Dispatcher
from dispatcher.events import WaitingEvents
from dispatcher.identity import Labels
from dispatcher.informers import Informer, JobStore, PodStore
from dispatcher.keys import Kind
from dispatcher.kube import Kube
from dispatcher.metrics import Metrics, serve
from dispatcher.on_behalf import OnBehalf, RetryPolicy
from dispatcher.outcomes import Outcomes
from dispatcher.reporting import Reporter
from dispatcher.triggers import MARKER_SWEEP
from dispatcher.workers import Workers
from dispatcher.workqueue import WorkQueue

log = logging.getLogger("dispatcher")
# Reconcile workers: different keys in parallel, one key never twice at once.
WORKERS = 4
SYNC_TIMEOUT_S = 60.0
API_PROBE_S = 2.0  # readiness asks the API server's /readyz at most this often
STOP_TIMEOUT_S = 30.0
MARKER_SWEEP_MIN_S, MARKER_SWEEP_MAX_S = 5.0, 600.0


def _caps(settings: DispatcherSettings) -> Caps:
    return Caps(
        max_running=settings.caps.max_running,
        per_instrument={n: o.max_running for n, o in settings.instruments.items() if o.max_running},
    )


def _retry(settings: DispatcherSettings) -> RetryPolicy:
    return RetryPolicy(by_dispatcher=settings.retries.mode == "dispatcher",
                       max_attempts=settings.retries.max_attempts,
                       delay_s=settings.retries.delay_s)


@dataclass
class ApiProbe:
    """Readiness of our API side: the Job watch is up *and* the API server says it can
    serve (its /readyz checks etcd; a watch fed from its cache does not notice an etcd
    outage, while every create would fail). Probed at most every ``API_PROBE_S``."""

    kube: Kube
    informer: Informer
    _last: tuple[float, bool] = (0.0, False)  # (monotonic time of the probe, its answer)

    def ready(self) -> bool:
        if not self.informer.healthy:
            return False
        probed_at, ready = self._last
        if time.monotonic() - probed_at > API_PROBE_S:
            ready = self.kube.healthy()
            self._last = (time.monotonic(), ready)
        return ready


class Daemon:
    """The daemon, over our own boundaries: ``kube`` for the API, ``client`` for the
    pending queue, ``outcome_client`` for what we send (``build`` makes the real ones)."""

    def __init__(self, *, settings: DispatcherSettings, kube: Kube, template: jinja2.Template,
                 client: Transport, outcome_client: Transport,
                 queue: WorkQueue | None = None) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.metrics = metrics = Metrics()
        self.labels = labels = Labels(settings.jobs.label_prefix)
        self.jobs, self.pods = JobCache(labels), PodCache()
        self.queue = queue if queue is not None else WorkQueue()
        self.client = client
        self.reporter = Reporter(client=outcome_client, queues=settings.broker.queues)
        self.events = WaitingEvents(kube=kube, on_drop=metrics.events_dropped.inc)
        admitter = Admitter(kube=kube, labels=labels, identity=settings.identity,
                            caps=_caps(settings), jobs=self.jobs, pods=self.pods,
                            queue=self.queue, events=self.events, metrics=metrics)
        on_behalf = OnBehalf(kube=kube, labels=labels, reporter=self.reporter, metrics=metrics,
                             retry=_retry(settings), pending_queue=settings.broker.queues.pending)
        outcomes = Outcomes(kube=kube, labels=labels, jobs=self.jobs, pods=self.pods,
                            on_behalf=on_behalf, image_pull_grace_s=settings.image_pull_grace_s,
                            fault_point=settings.fault_point)
        self.intake = Dispatcher(settings=settings, kube=kube, jobs=self.jobs, pods=self.pods,
                                 queue=self.queue, reporter=self.reporter, template=template,
                                 metrics=metrics)
        self.workers = Workers(queue=self.queue, count=WORKERS, reconcilers={
            Kind.RB: admitter.reconcile,
            Kind.JOB: outcomes.reconcile,
            Kind.CAP_SLOT: lambda _: admitter.wake_cap_blocked(),
            Kind.MARKER_SWEEP: self._sweep_markers,
        })
        self.job_informer = Informer(
            name="Job", store=JobStore(kube=kube, labels=labels, cache=self.jobs),
            queue=self.queue, stop=self.stop, resync_s=settings.resync_seconds,
            on_reconnect=metrics.api_reconnects.inc)
        self.pod_informer = Informer(
            name="Pod", store=PodStore(kube=kube, labels=labels, cache=self.pods),
            queue=self.queue, stop=self.stop, resync_s=settings.resync_seconds)
        self.consumer = Consumer(client=self.client, dispatcher=self.intake,
                                 destination=settings.broker.queues.pending,
                                 workers=settings.concurrency)
        self.api = ApiProbe(kube=kube, informer=self.job_informer)
        self._threads = [threading.Thread(target=i.run, name=f"{i.name.lower()}-watch",
                                          daemon=True)
                         for i in (self.job_informer, self.pod_informer)]

    def alive(self) -> bool:
        """Our threads run. A lost broker or API is readiness, not liveness: a restart
        would not bring them back."""
        threads = all(t.is_alive() for t in self._threads)
        return threads and self.workers.alive() and self.consumer.alive()

    def ready(self) -> bool:
        return self.client.connected and self.api.ready()

    def run(self) -> int:
        server = None
        if self.settings.http_port:
            server = serve(port=self.settings.http_port, metrics=self.metrics, live=self.alive,
                           ready=self.ready, collect=self._fill_gauges)
        self.events.start()
        for thread in self._threads:
            thread.start()
        self.workers.start()
        if not (self.jobs.synced.wait(SYNC_TIMEOUT_S)
                and self.pods.synced.wait(SYNC_TIMEOUT_S)):
            log.warning("no Job list from the API yet; consuming anyway (runs wait in the broker)")
        if self.client.ensure_connected(stop=self.stop):
            self.consumer.start()
            if self.settings.jobs.cancel_marker_ttl_seconds > 0:
                self.queue.add(MARKER_SWEEP)
            log.info("dispatcher %s consuming %s into namespace %s", self.settings.identity,
                     self.settings.broker.queues.pending, self.settings.jobs.namespace)
            self.stop.wait()
            log.info("SIGTERM: finishing in-flight dispatches")
            self.consumer.stop(timeout=STOP_TIMEOUT_S)
        self.stop.set()
        self.workers.stop(timeout=STOP_TIMEOUT_S)
        self.events.stop()
        self.reporter.client.disconnect()
        if server is not None:
            server.shutdown()
        return 0

    def _sweep_markers(self, _: str) -> float:
        """Cancel markers live days: a sweep every quarter of their TTL (at most every
        10 min) costs one LIST and deletes each on time."""
        ttl = self.settings.jobs.cancel_marker_ttl_seconds
        self.intake.cancels.sweep_markers(now=time.time())
        return min(max(ttl / 4, MARKER_SWEEP_MIN_S), MARKER_SWEEP_MAX_S)

    def _fill_gauges(self) -> None:
        """The waiting/running gauges from the Job cache, at scrape time (no API call)."""
        key = self.labels.key("instrument")
        waiting: Counter[str] = Counter()
        running: Counter[str] = Counter()
        for job in self.jobs.all():
            instrument = (job.get("metadata", {}).get("labels") or {}).get(key, "")
            if is_waiting(job):
                waiting[instrument] += 1
            elif is_running(job):
                running[instrument] += 1
        self.metrics.set_runs(waiting=waiting, running=running)
        # The first connect is not a reconnect.
        self.metrics.broker_reconnects.set(max(self.client.reconnects - 1, 0))


def build(*, settings: DispatcherSettings, kubeconfig: Path | None, template: Any) -> Daemon:
    kube = Kube.connect(kubeconfig=kubeconfig, namespace=settings.jobs.namespace,
                        qps=settings.api_qps, burst=settings.api_burst)
    # Outcomes and dead letters go on a connection of their own without heartbeats,
    # so a broker stall delays them instead of duplicating them (see Reporter).
    outcome_client = StompClient(
        settings=settings.broker,
        client_name=f"{settings.identity}-outcomes",
        heartbeats=False,
        receipt_timeout_s=settings.broker.outcome_receipt_timeout_s,
    )
    client = StompClient(settings=settings.broker, client_name=settings.identity)
    return Daemon(settings=settings, kube=kube, template=template, client=client,
                  outcome_client=outcome_client)

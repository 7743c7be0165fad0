"""The composition root: every component built once, in one place, then run until stop.

``dispatcher.__main__`` parses arguments and configures logging; this module builds
the clients, caches, loops and endpoints from the typed settings, starts them, and
runs the housekeeping loop (the cancel-marker sweep) until SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from autoreduce_common.stomp_client import StompClient

from dispatcher import voids
from dispatcher.admission import Caps, is_running, is_waiting
from dispatcher.config import DispatcherSettings
from dispatcher.consumer import Consumer
from dispatcher.controller import Controller
from dispatcher.direct import DirectAdmission
from dispatcher.dispatch import Dispatcher
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache
from dispatcher.kube import Kube, KubeError
from dispatcher.manifests import effective_runner
from dispatcher.metrics import Metrics, serve
from dispatcher.outcomes import Outcomes
from dispatcher.pods import PodCache
from dispatcher.reporting import Reporter
from dispatcher.retries import Retries, RetryPolicy
from dispatcher.settle import Settler

log = logging.getLogger("dispatcher")

HOUSEKEEPING_S = 5.0
MARKER_SWEEP_MAX_S = 600.0


def _refresh_metrics(metrics: Metrics, controller: Controller, client: StompClient) -> None:
    """Fill the gauges from the Job cache at scrape time (no API call)."""
    key = controller.labels.key("instrument")
    waiting: Counter[str] = Counter()
    running: Counter[str] = Counter()
    for job in controller.cache.all():
        instrument = (job.get("metadata", {}).get("labels") or {}).get(key, "")
        if is_waiting(job):
            waiting[instrument] += 1
        elif is_running(job):
            running[instrument] += 1
    metrics.set_runs(waiting=waiting, running=running)
    metrics.broker_reconnects.set(max(client.reconnects - 1, 0))  # the first is a connect


class _MarkerSweep:
    """Runs the cancel-marker sweep now and then: a marker lives days, so a sweep
    every quarter of the TTL (at most every 10 min) costs one LIST and is on time."""

    def __init__(self, dispatcher: Dispatcher, *, ttl_s: int) -> None:
        self.dispatcher = dispatcher
        self.every_s = min(max(ttl_s / 4, HOUSEKEEPING_S), MARKER_SWEEP_MAX_S)
        self.enabled = ttl_s > 0
        self.last = 0.0

    def maybe_run(self, now: float) -> None:
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        try:
            self.dispatcher.cancels.sweep_markers(now=now)
        except KubeError as error:
            log.warning("cancel-marker sweep failed: %s", error)


def _direct_admission(settings: DispatcherSettings) -> bool:
    ttl = settings.jobs.ttl_seconds_after_finished
    if settings.direct_admission and not voids.direct_allowed(ttl_seconds_after_finished=ttl):
        log.warning("direct admission off: jobs.ttl_seconds_after_finished (%d s) is under "
                    "%.0f s (dispatcher/voids.py); every run is created suspended", ttl,
                    voids.VOID_DELETABLE_AFTER_S)
        return False
    return settings.direct_admission


def run(*, settings: DispatcherSettings, kubeconfig: Path | None, template: object) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    metrics = Metrics()
    kube = Kube.connect(
        kubeconfig=kubeconfig,
        namespace=settings.jobs.namespace,
        qps=settings.api_qps,
        burst=settings.api_burst,
        observer=metrics,
    )
    client = StompClient(settings=settings.broker, client_name=settings.identity)
    # Outcomes and dead letters go on a connection of their own without heartbeats,
    # so a broker stall delays them instead of duplicating them (see Reporter).
    reporter = Reporter(
        client=StompClient(
            settings=settings.broker,
            client_name=f"{settings.identity}-outcomes",
            heartbeats=False,
            receipt_timeout_s=settings.broker.outcome_receipt_timeout_s,
        ),
        queues=settings.broker.queues,
    )
    labels = Labels(settings.jobs.label_prefix)
    caps = Caps(
        max_running=settings.caps.max_running,
        per_instrument={
            name: o.max_running for name, o in settings.instruments.items() if o.max_running
        },
    )
    pods = PodCache()
    jobs = JobCache(labels)
    settler = Settler(
        kube=kube,
        labels=labels,
        reporter=reporter,
        retries=Retries(
            policy=RetryPolicy(
                by_dispatcher=settings.retries.mode == "dispatcher",
                max_attempts=settings.retries.max_attempts,
                delay_s=settings.retries.delay_s,
            ),
            kube=kube,
            labels=labels,
            reporter=reporter,
            pending_queue=settings.broker.queues.pending,
        ),
        pods=pods,
        metrics=metrics,
        image_pull_grace_s=settings.image_pull_grace_s,
        oom_policy=lambda instrument: effective_runner(settings, instrument).oom_retry,
        fault_point=settings.fault_point,
    )
    outcomes = Outcomes(settler=settler, jobs=jobs, pods=pods,
                        stuck_grace_s=settings.image_pull_grace_s)
    controller = Controller(
        kube=kube,
        labels=labels,
        identity=settings.identity,
        caps=caps,
        resync_seconds=settings.resync_seconds,
        pods=pods,
        cache=jobs,
        observers=[outcomes],
        metrics=metrics,
        void_image=settings.runner.image,
        fault_point=settings.fault_point,
    )
    dispatcher = Dispatcher(
        settings=settings,
        kube=kube,
        controller=controller,
        reporter=reporter,
        template=template,  # type: ignore[arg-type]
        metrics=metrics,
        direct=DirectAdmission(controller=controller, enabled=_direct_admission(settings),
                               fault_point=settings.fault_point),
    )
    consumer = Consumer(
        client=client,
        dispatcher=dispatcher,
        destination=settings.broker.queues.pending,
        workers=settings.concurrency,
    )
    server = None
    if settings.http_port:
        server = serve(
            port=settings.http_port,
            metrics=metrics,
            # Alive while our threads run; a lost broker or API is readiness, not
            # liveness: a restart would not bring them back.
            live=lambda: controller.alive() and outcomes.alive() and consumer.alive(),
            ready=lambda: client.answering and controller.api_ready(),
            refresh=lambda: _refresh_metrics(metrics, controller, client),
        )
    outcomes.start()
    controller.start()
    # Not the Job list: at 50,000 waiting runs it takes many seconds, and a run on a
    # free RB need not wait for it (Controller.wait_pods_synced).
    if not controller.wait_pods_synced(timeout=60):
        log.warning("no pod list from the API yet; consuming anyway (runs wait in the broker)")
    if not client.ensure_connected(stop=stop):
        return 0
    consumer.start()
    log.info(
        "dispatcher %s consuming %s into namespace %s",
        settings.identity,
        settings.broker.queues.pending,
        settings.jobs.namespace,
    )
    sweep = _MarkerSweep(dispatcher, ttl_s=settings.jobs.cancel_marker_ttl_seconds)
    while not stop.wait(HOUSEKEEPING_S):
        sweep.maybe_run(time.time())
    log.info("SIGTERM: finishing in-flight dispatches")
    consumer.stop(timeout=30)
    controller.stop()
    outcomes.stop()
    reporter.client.disconnect()
    if server is not None:
        server.shutdown()
    return 0

"""The Job informer: a list+watch of the managed Jobs into the ``JobCache``, and the
reconcilers told of every change so that they can queue the key it touches.

Observers only enqueue (an RB for admission, a Job for its outcome); the work runs on
their own workers, never on the watch thread. After a list (at start, after a watch
gap) and on the periodic resync every cached Job is told again as ``SYNC``: a safety
net for a key a reconciler dropped, not the mechanism that drives it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from dispatcher import admission
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache, slim
from dispatcher.kube import Gone, Kube, KubeError
from dispatcher.metrics import Metrics
from dispatcher.pods import PodView

log = logging.getLogger(__name__)
Job = dict[str, Any]
SYNC = "SYNC"  # the kind of a replayed (listed or resynced) Job
# Re-list at least this often while the API is away: a re-list is one call, and a
# longer cap only delays admission once the API is back (10 s cost up to 10 s).
WATCH_BACKOFF_MAX_S = 3.0


class Observer(Protocol):
    """A reconciler's event handlers: cheap, non-blocking, they only queue keys."""

    def job_changed(self, kind: str, job: Job) -> None: ...

    def pod_changed(self, view: PodView, deleted: bool) -> None: ...


class JobWatch:
    def __init__(self, *, kube: Kube, labels: Labels, cache: JobCache,
                 observers: Sequence[Observer], metrics: Metrics, resync_seconds: float,
                 stop: threading.Event, hold_first_list_s: float = 0.0) -> None:
        self.kube = kube
        self.labels = labels
        self.cache = cache
        self.observers = observers
        self.metrics = metrics
        self.resync_seconds = resync_seconds
        self._stop = stop
        self._selector = f"{labels.managed}=true"
        self.hold_first_list_s = hold_first_list_s
        self.healthy = False  # the watch is up (readiness adds the API's /readyz)

    def run(self) -> None:
        backoff = 0.2
        failed = False
        while not self._stop.is_set():
            try:
                resource_version = self.relist()
                if failed:
                    self.metrics.api_reconnects.inc()
                failed = False
                backoff = 0.2
                self._follow(resource_version)
            except Gone:
                log.info("Job watch expired; re-listing")
            except KubeError as error:
                self.healthy = False
                failed = True
                log.warning("Job watch failed (%s); re-listing in %.1fs", error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def relist(self) -> str:
        """List every managed Job into the cache, tell every observer of each, and
        return the list's resourceVersion (to watch from)."""
        # Slimmed while the pages are read: the cache keeps no more, and the outcome
        # path reads a failed run's whole Job from the API.
        started = time.monotonic()
        first = not self.cache.synced.is_set()
        jobs, resource_version = self.kube.list_jobs(selector=self._selector, keep=slim)
        if first and self.hold_first_list_s:  # the fault suite's slow list (faults)
            self._stop.wait(self.hold_first_list_s)
        self.cache.replace_all(jobs, resource_version)
        if first:
            # Until now only runs on free RBs were admitted (Controller.jobs_of_rb).
            log.info("Job cache in: %d Jobs listed in %.1fs; admitting waiting runs",
                     len(jobs), time.monotonic() - started)
        self.healthy = True
        # The cache, not the list: it also holds our own Jobs newer than the list.
        for job in self.cache.all():
            self._tell(SYNC, job)
        return resource_version

    def _follow(self, resource_version: str) -> None:
        last_resync = time.monotonic()
        while not self._stop.is_set():
            for event in self.kube.watch_jobs(
                selector=self._selector, resource_version=resource_version, timeout_s=60
            ):
                if event.kind == "BOOKMARK":
                    resource_version = event.obj["metadata"]["resourceVersion"]
                    continue
                resource_version = event.obj.get("metadata", {}).get(
                    "resourceVersion", resource_version
                )
                self.on_event(event.kind, event.obj)
                if self._stop.is_set():
                    return
            if time.monotonic() - last_resync > self.resync_seconds:
                # From the cache, not a re-list: the watch misses nothing, and at
                # 50,000 waiting runs a re-list is seconds of CPU and twice the cache.
                last_resync = time.monotonic()
                self.replay()

    def replay(self) -> None:
        for job in self.cache.all():
            self._tell(SYNC, job)

    def on_event(self, kind: str, job: Job) -> None:
        if kind == "DELETED":
            self.cache.remove(admission.name_of(job))
        else:
            self.cache.upsert(job)
        self._tell(kind, job)

    def pod_changed(self, view: PodView, deleted: bool) -> None:
        """The pod watch's ``on_change``: every observer hears of it."""
        for observer in self.observers:
            observer.pod_changed(view, deleted)

    def _tell(self, kind: str, job: Job) -> None:
        for observer in self.observers:
            try:
                observer.job_changed(kind, job)
            except Exception:
                # A bug in one reconciler's handler must not stop the watch.
                log.exception("%s handler failed for Job %s", type(observer).__name__,
                              admission.name_of(job))

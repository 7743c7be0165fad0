"""Reduction pods as the dispatcher sees them: a typed view, a cache fed by list+watch,
and the rules that read it (pure apart from ``PodWatch``).

The pods, not the Job's conditions, say when an RB is really free: a pod that is
being deleted, evicted or stopped at its deadline keeps running its script through
its grace period, and a Job whose pods were deleted under it (``kubectl delete job``
with background cascading) is gone while they still run. Every reduction pod carries
our finalizer (``Labels.pod_finalizer``), so it stays visible here until the
dispatcher has settled its run's outcome and released it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dispatcher import failures
from dispatcher.identity import Labels
from dispatcher.kube import Gone, Kube, KubeError

log = logging.getLogger(__name__)
Obj = dict[str, Any]
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
WATCH_BACKOFF_MAX_S = 3.0


@dataclass(frozen=True)
class PodView:
    """What the dispatcher needs of one reduction pod."""

    name: str
    job: str
    rb: str
    phase: str
    deleting: bool
    finalized: bool  # still carries our finalizer
    # Why it cannot start (a waiting reason that will not fix itself), or None.
    stuck: str | None = None

    @property
    def live(self) -> bool:
        """Its containers may still run: it holds its RB."""
        return self.phase not in TERMINAL_PHASES


def pod_view(pod: Obj, *, labels: Labels) -> PodView:
    metadata = pod.get("metadata") or {}
    pod_labels = metadata.get("labels") or {}
    return PodView(
        name=str(metadata.get("name", "")),
        job=str(pod_labels.get(JOB_NAME_LABEL, "")),
        rb=str(pod_labels.get(labels.key("rb-number"), "")),
        phase=str((pod.get("status") or {}).get("phase") or "Pending"),
        deleting=bool(metadata.get("deletionTimestamp")),
        finalized=labels.pod_finalizer in (metadata.get("finalizers") or []),
        stuck=failures.stuck_reason(pod),
    )


class PodCache:
    """Pod views by name, indexed by RB and by Job.

    The indexes matter in a busy cycle: admission asks for one RB's live pods on
    every pass, and thousands of pods can be Pending while the autoscaler works.
    """

    def __init__(self) -> None:
        self._pods: dict[str, PodView] = {}
        self._by_rb: dict[str, dict[str, PodView]] = {}
        self._by_job: dict[str, dict[str, PodView]] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()

    def replace_all(self, views: list[PodView]) -> None:
        with self._lock:
            self._pods, self._by_rb, self._by_job = {}, {}, {}
            for view in views:
                self._add(view)
        self.synced.set()

    def upsert(self, view: PodView) -> None:
        with self._lock:
            self._drop(view.name)
            self._add(view)

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _add(self, view: PodView) -> None:
        self._pods[view.name] = view
        self._by_rb.setdefault(view.rb, {})[view.name] = view
        self._by_job.setdefault(view.job, {})[view.name] = view

    def _drop(self, name: str) -> None:
        view = self._pods.pop(name, None)
        if view is None:
            return
        for index, key in ((self._by_rb, view.rb), (self._by_job, view.job)):
            bucket = index.get(key)
            if bucket is not None:
                bucket.pop(name, None)
                if not bucket:
                    del index[key]

    def live_of_rb(self, rb: str) -> list[PodView]:
        with self._lock:
            return [view for view in (self._by_rb.get(rb) or {}).values() if view.live]

    def of_job(self, job: str) -> list[PodView]:
        with self._lock:
            return list((self._by_job.get(job) or {}).values())

    def all(self) -> list[PodView]:
        with self._lock:
            return list(self._pods.values())


PodChanged = Callable[[PodView, bool], None]  # (view, deleted)


class PodWatch:
    """Keeps a ``PodCache`` current from a list+watch of the managed pods and tells
    ``on_change`` about every change (on the watch thread)."""

    def __init__(self, *, kube: Kube, labels: Labels, cache: PodCache,
                 on_change: PodChanged, stop: threading.Event) -> None:
        self._kube = kube
        self._labels = labels
        self._cache = cache
        self._on_change = on_change
        self._stop = stop

    def run(self) -> None:
        selector = f"{self._labels.managed}=true"
        backoff = 0.2
        while not self._stop.is_set():
            try:
                resource_version = self._relist(selector)
                backoff = 0.2
                self._follow(selector, resource_version)
            except Gone:
                log.info("Pod watch expired; re-listing")
            except KubeError as error:
                log.warning("Pod watch failed (%s); re-listing in %.1fs", error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def _relist(self, selector: str) -> str:
        views, resource_version = self._kube.list_pods_at(
            selector=selector, keep=lambda pod: pod_view(pod, labels=self._labels)
        )
        before = {view.name: view for view in self._cache.all()}
        self._cache.replace_all(views)
        for view in views:
            self._notify(view, deleted=False)
        for name in set(before) - {view.name for view in views}:
            # Gone while we were not watching: its RB may be free now.
            self._notify(before[name], deleted=True)
        return resource_version

    def _follow(self, selector: str, resource_version: str) -> None:
        while not self._stop.is_set():
            for event in self._kube.watch_pods(selector=selector,
                                               resource_version=resource_version, timeout_s=60):
                resource_version = str(event.obj.get("metadata", {}).get(
                    "resourceVersion", resource_version))
                if event.kind == "BOOKMARK":
                    continue
                view = pod_view(event.obj, labels=self._labels)
                if event.kind == "DELETED":
                    self._cache.remove(view.name)
                else:
                    self._cache.upsert(view)
                self._notify(view, deleted=event.kind == "DELETED")
                if self._stop.is_set():
                    return

    def _notify(self, view: PodView, *, deleted: bool) -> None:
        try:
            self._on_change(view, deleted)
        except Exception:
            # A bug in a reaction must not stop the watch that admission relies on.
            log.exception("reaction to pod %s failed", view.name)

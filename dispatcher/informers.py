"""List+watch of our Jobs and pods: keep the caches current and queue the keys a
change touches (``triggers``). Nothing here decides anything.

A watch that ends, expires (410 Gone) or fails is followed by a fresh list, and a
list queues every key again: a missed event costs one re-list, never a lost step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from dispatcher import triggers
from dispatcher.caches import JobCache, PodCache, slim
from dispatcher.identity import Labels
from dispatcher.keys import Key, Kind
from dispatcher.kube import Gone, Kube, KubeError, WatchEvent
from dispatcher.pods import pod_view
from dispatcher.workqueue import WorkQueue

log = logging.getLogger(__name__)
Obj = dict[str, Any]
# Re-list at least this often while the API is away: a re-list is one call, and a
# longer cap only delays admission once the API is back (10 s cost up to 10 s).
WATCH_BACKOFF_MAX_S = 3.0
WATCH_TIMEOUT_S = 60


class Store(Protocol):
    """One kind of object: how a list and an event change the cache, and which keys."""

    def list_all(self) -> tuple[list[Obj], str]: ...
    def watch(self, resource_version: str) -> Iterator[WatchEvent]: ...
    def replace(self, objs: list[Obj]) -> Iterable[Key]: ...
    def apply(self, kind: str, obj: Obj) -> Iterable[Key]: ...


class JobStore:
    def __init__(self, *, kube: Kube, labels: Labels, cache: JobCache) -> None:
        self._kube, self._labels, self.cache = kube, labels, cache
        self._selector = f"{labels.managed}=true"

    def list_all(self) -> tuple[list[Obj], str]:
        return self._kube.list_jobs(selector=self._selector, keep=slim)

    def watch(self, resource_version: str) -> Iterator[WatchEvent]:
        return self._kube.watch_jobs(selector=self._selector, resource_version=resource_version,
                                     timeout_s=WATCH_TIMEOUT_S)

    def replace(self, objs: list[Obj]) -> Iterable[Key]:
        self.cache.replace_all(objs)
        keys = [triggers.CAP_SLOT]
        for job in objs:
            keys.extend(triggers.job_keys(self._labels, job, deleted=False))
        # Every RB, waiting or not: a re-list is the safety net for a missed event.
        keys.extend(Key(Kind.RB, rb) for rb in self.cache.rbs() if rb)
        return keys

    def apply(self, kind: str, obj: Obj) -> Iterable[Key]:
        deleted = kind == "DELETED"
        if deleted:
            self.cache.remove(str((obj.get("metadata") or {}).get("name", "")))
        else:
            self.cache.upsert(obj)
        return triggers.job_keys(self._labels, obj, deleted=deleted)


class PodStore:
    def __init__(self, *, kube: Kube, labels: Labels, cache: PodCache) -> None:
        self._kube, self._labels, self.cache = kube, labels, cache
        self._selector = f"{labels.managed}=true"

    def list_all(self) -> tuple[list[Obj], str]:
        return self._kube.list_pods_at(selector=self._selector)

    def watch(self, resource_version: str) -> Iterator[WatchEvent]:
        return self._kube.watch_pods(selector=self._selector, resource_version=resource_version,
                                     timeout_s=WATCH_TIMEOUT_S)

    def replace(self, objs: list[Obj]) -> Iterable[Key]:
        views = [pod_view(pod, labels=self._labels) for pod in objs]
        before = {view.name: view for view in self.cache.all()}
        self.cache.replace_all(views)
        keys = [key for view in views for key in triggers.pod_keys(view, deleted=False)]
        for name in set(before) - {view.name for view in views}:
            # Gone while we were not watching: its RB may be free now.
            keys.extend(triggers.pod_keys(before[name], deleted=True))
        return keys

    def apply(self, kind: str, obj: Obj) -> Iterable[Key]:
        view = pod_view(obj, labels=self._labels)
        deleted = kind == "DELETED"
        if deleted:
            self.cache.remove(view.name)
        else:
            self.cache.upsert(view)
        return triggers.pod_keys(view, deleted=deleted)


class Informer:
    """Runs one store's list+watch on its own thread until ``stop``."""

    def __init__(self, *, name: str, store: Store, queue: WorkQueue, stop: threading.Event,
                 resync_s: float, on_reconnect: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.store, self._queue, self._stop = store, queue, stop
        self._resync_s = resync_s
        self._on_reconnect = on_reconnect
        self.healthy = False  # the last list or watch call succeeded

    def run(self) -> None:
        backoff, failed = 0.2, False
        while not self._stop.is_set():
            try:
                resource_version = self._relist()
                if failed:
                    self._on_reconnect()
                backoff, failed = 0.2, False
                self._follow(resource_version)
            except Gone:
                log.info("%s watch expired; re-listing", self.name)
            except KubeError as error:
                self.healthy, failed = False, True
                log.warning("%s watch failed (%s); re-listing in %.1fs", self.name, error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def _relist(self) -> str:
        objs, resource_version = self.store.list_all()
        keys = self.store.replace(objs)
        self.healthy = True
        self._enqueue(keys)
        return resource_version

    def _follow(self, resource_version: str) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            for event in self.store.watch(resource_version):
                resource_version = str((event.obj.get("metadata") or {}).get(
                    "resourceVersion", resource_version))
                if event.kind != "BOOKMARK":
                    self._enqueue(self.store.apply(event.kind, event.obj))
                if self._stop.is_set():
                    return
            if time.monotonic() - started > self._resync_s:
                return  # re-list: the safety net, not the mechanism

    def _enqueue(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._queue.add(key)

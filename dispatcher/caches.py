"""The daemon's caches: Jobs by name and by RB, and pod views, as the list+watch
and our own writes last showed them.

Only a cache: rebuilt from a list on every start and after any watch gap, and every
decision that matters is made true by a compare-and-swap against the API.
"""

from __future__ import annotations

import threading
from typing import Any

from dispatcher import admission
from dispatcher.identity import Labels
from dispatcher.pods import PodView
from dispatcher.triggers import rb_of

Job = dict[str, Any]


def _rv(job: Job) -> int:
    try:
        return int(job.get("metadata", {}).get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


def slim(job: Job) -> Job:
    """What admission needs of a Job: its identity, labels, annotations, suspend flag
    and status. The pod template and managedFields are most of a Job's size, and
    10,000 waiting runs are held here. A finished Job keeps its spec: the outcome
    reconciler reads its memory limit and deadline, and finished Jobs are few (their
    TTL removes them)."""
    metadata = {k: v for k, v in (job.get("metadata") or {}).items() if k != "managedFields"}
    spec = job.get("spec") or {}
    if admission.is_finished(job):
        return {**job, "metadata": metadata}
    return {
        "metadata": metadata,
        "spec": {k: spec[k] for k in ("suspend", "activeDeadlineSeconds") if k in spec},
        "status": job.get("status") or {},
    }


class JobCache:
    """Jobs by name and by RB, fed by list+watch and by our own writes (read-your-writes).

    The RB index matters at scale: admission asks for one RB's Jobs on every pass,
    and a scan of 10,000 waiting Jobs under the lock was most of its CPU.
    """

    def __init__(self, labels: Labels) -> None:
        self._labels = labels
        self._jobs: dict[str, Job] = {}
        self._by_rb: dict[str, dict[str, Job]] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()  # set by the first list

    def replace_all(self, jobs: list[Job]) -> None:
        slimmed = {admission.name_of(job): slim(job) for job in jobs}
        by_rb: dict[str, dict[str, Job]] = {}
        for name, job in slimmed.items():
            by_rb.setdefault(self.rb_of(job), {})[name] = job
        with self._lock:
            self._jobs, self._by_rb = slimmed, by_rb
        self.synced.set()

    def upsert(self, job: Job) -> None:
        name = admission.name_of(job)
        slimmed = slim(job)
        with self._lock:
            known = self._jobs.get(name)
            if known is None or _rv(job) >= _rv(known):
                if known is not None:
                    self._unindex(name, known)
                self._jobs[name] = slimmed
                self._by_rb.setdefault(self.rb_of(slimmed), {})[name] = slimmed

    def remove(self, name: str) -> None:
        with self._lock:
            known = self._jobs.pop(name, None)
            if known is not None:
                self._unindex(name, known)

    def _unindex(self, name: str, job: Job) -> None:
        rb = self.rb_of(job)
        bucket = self._by_rb.get(rb)
        if bucket is not None:
            bucket.pop(name, None)
            if not bucket:
                del self._by_rb[rb]

    def get(self, name: str) -> Job | None:
        with self._lock:
            return self._jobs.get(name)

    def rb_of(self, job: Job) -> str:
        return rb_of(self._labels, job)

    def of_rb(self, rb: str) -> list[Job]:
        with self._lock:
            return list((self._by_rb.get(rb) or {}).values())

    def running(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if admission.is_running(job)]

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def rbs(self) -> set[str]:
        with self._lock:
            return set(self._by_rb)


class PodCache:
    """Pod views by name, with lookups by RB and by Job."""

    def __init__(self) -> None:
        self._pods: dict[str, PodView] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()  # set by the first list

    def replace_all(self, views: list[PodView]) -> None:
        with self._lock:
            self._pods = {view.name: view for view in views}
        self.synced.set()

    def upsert(self, view: PodView) -> None:
        with self._lock:
            self._pods[view.name] = view

    def remove(self, name: str) -> None:
        with self._lock:
            self._pods.pop(name, None)

    def live_of_rb(self, rb: str) -> list[PodView]:
        with self._lock:
            return [view for view in self._pods.values() if view.rb == rb and view.live]

    def of_job(self, job: str) -> list[PodView]:
        with self._lock:
            return [view for view in self._pods.values() if view.job == job]

    def all(self) -> list[PodView]:
        with self._lock:
            return list(self._pods.values())

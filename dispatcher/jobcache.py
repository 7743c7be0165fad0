"""The dispatcher's view of its Jobs: slim copies by name, indexed by RB, fed by
list+watch and by our own writes (read-your-writes).

Only a cache: it is rebuilt from a list on every start, and every decision that
matters is made true by a Lease compare-and-swap against the API.
"""

from __future__ import annotations

import threading
from typing import Any

from dispatcher import admission
from dispatcher.identity import Labels

Job = dict[str, Any]


def _as_int(resource_version: object) -> int:
    try:
        return int(str(resource_version or 0))
    except ValueError:
        return 0


def _rv(job: Job) -> int:
    return _as_int(job.get("metadata", {}).get("resourceVersion"))


def slim(job: Job) -> Job:
    """What admission needs of a Job: its identity, labels, annotations, suspend flag
    and status. The pod template and managedFields are most of a Job's size, and
    10,000 waiting runs are held here."""
    metadata = {k: v for k, v in (job.get("metadata") or {}).items() if k != "managedFields"}
    spec = job.get("spec") or {}
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
        self.synced = threading.Event()  # set by the first complete list

    def replace_all(self, jobs: list[Job], resource_version: str = "") -> None:
        """The list's Jobs, plus those of our own writes newer than the list (``upsert``
        while it was read): the dispatcher consumes during its first list, and a Job it
        created after the list's snapshot would otherwise vanish until the watch, which
        starts at ``resource_version``, brings it back."""
        kept = {admission.name_of(job): slim(job) for job in jobs}
        snapshot = _as_int(resource_version)
        with self._lock:
            for name, job in self._jobs.items():
                if snapshot and _rv(job) > snapshot:
                    kept[name] = job  # the list's copy, if any, is older
            by_rb: dict[str, dict[str, Job]] = {}
            for name, job in kept.items():
                by_rb.setdefault(self.rb_of(job), {})[name] = job
            self._jobs, self._by_rb = kept, by_rb
        self.synced.set()

    def upsert(self, job: Job) -> None:
        name = admission.name_of(job)
        kept = slim(job)
        with self._lock:
            known = self._jobs.get(name)
            if known is None or _rv(job) >= _rv(known):
                if known is not None:
                    self._unindex(name, known)
                self._jobs[name] = kept
                self._by_rb.setdefault(self.rb_of(kept), {})[name] = kept

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
        labels = job.get("metadata", {}).get("labels") or {}
        return str(labels.get(self._labels.key("rb-number"), ""))

    def of_rb(self, rb: str) -> list[Job]:
        with self._lock:
            return list((self._by_rb.get(rb) or {}).values())

    def running(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if admission.is_running(job)]

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

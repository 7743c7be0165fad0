"""Events that explain why a run waits, recorded off the admission thread.

A "Waiting" Event is written once per Job (the first time it cannot be admitted)
by a background thread with a bounded queue: admission never waits on an Event
write, and in a burst bigger than the queue the surplus notes are dropped (and
counted) rather than spending the API budget on commentary.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dispatcher import admission
from dispatcher.identity import Labels
from dispatcher.kube import Kube

log = logging.getLogger(__name__)
Job = dict[str, Any]


@dataclass(frozen=True)
class _Note:
    job: Job
    reason: str
    note: str


def held_note(labels: Labels, *, rb: str, holder: Job | None, holder_name: str) -> str:
    """Why a run waits for its RB, naming the run that holds it (pure)."""
    annotations = ((holder or {}).get("metadata") or {}).get("annotations") or {}
    run = annotations.get(labels.key("run"))
    who = f"Job {holder_name}" + (f" ({run})" if run else "")
    return f"waiting for RB {rb}: held by {who}"


def caps_note(labels: Labels, *, caps: admission.Caps, job: Job, running: list[Job]) -> str:
    """Why a run waits although its RB is free: which cap is full (pure)."""
    key = labels.key("instrument")
    instrument = ((job.get("metadata") or {}).get("labels") or {}).get(key, "")
    same = sum(
        1
        for other in running
        if ((other.get("metadata") or {}).get("labels") or {}).get(key) == instrument
    )
    limit = caps.per_instrument.get(instrument)
    if limit is not None and same >= limit:
        return f"waiting for a slot: {same} {instrument} runs reducing (instrument cap {limit})"
    return f"waiting for a slot: {len(running)} runs reducing (max_running {caps.max_running})"


class WaitingEvents:
    """Remembers which Jobs were told they wait; writes each note once, asynchronously."""

    def __init__(
        self, *, kube: Kube, capacity: int = 500, on_drop: Callable[[], None] | None = None
    ) -> None:
        self._kube = kube
        self._queue: queue.Queue[_Note | None] = queue.Queue(maxsize=capacity)
        self._noted: set[str] = set()
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # a daemon thread: it dies with us
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def waiting(self, job: Job, note: str) -> None:
        """Note that ``job`` waits (no-op if it was noted already)."""
        name = admission.name_of(job)
        with self._lock:
            if name in self._noted:
                return
            self._noted.add(name)
        try:
            self._queue.put_nowait(_Note(job=job, reason="Waiting", note=note))
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def held(self, labels: Labels, *, rb: str, jobs: list[Job], holder: Job) -> None:
        """A Waiting Event (once per Job) on every other waiting run of the RB."""
        holder_name = admission.name_of(holder)
        note = held_note(labels, rb=rb, holder=holder, holder_name=holder_name)
        for job in jobs:
            if admission.is_waiting(job) and admission.name_of(job) != holder_name:
                self.waiting(job, note)

    def record(self, job: Job, *, reason: str, note: str) -> None:
        """Any other Event, written off the caller's thread (dropped, counted, if full)."""
        try:
            self._queue.put_nowait(_Note(job=job, reason=reason, note=note))
        except queue.Full:
            if self._on_drop is not None:
                self._on_drop()

    def forget(self, name: str) -> None:
        with self._lock:
            self._noted.discard(name)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._kube.record_event(job=item.job, reason=item.reason, note=item.note)

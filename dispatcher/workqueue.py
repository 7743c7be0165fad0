"""Admission's work queue: RB numbers, de-duplicated, one RB on one worker at a time;
and the RBs a direct admission is creating a Job for right now."""

from __future__ import annotations

import threading
import time


class RbQueue:
    """A de-duplicating work queue of RB numbers (an RB queued twice runs once).

    Several workers take from it, but never the same RB at once: an RB queued again
    while a worker has it waits until that worker calls ``done``.
    """

    def __init__(self) -> None:
        self._items: dict[str, None] = {}
        self._busy: set[str] = set()
        self._cond = threading.Condition()

    def put(self, rb: str) -> None:
        with self._cond:
            self._items[rb] = None
            self._cond.notify()

    def get(self, *, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                rb = next((item for item in self._items if item not in self._busy), None)
                if rb is not None:
                    del self._items[rb]
                    self._busy.add(rb)
                    return rb
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    return None

    def done(self, rb: str) -> None:
        with self._cond:
            self._busy.discard(rb)
            if rb in self._items:
                self._cond.notify()


class InFlight:
    """RBs whose direct admission (``dispatcher.direct``) is between its Lease write and
    its Job create in this process: admission leaves them alone until it is done,
    rather than void a Job that is about to exist."""

    def __init__(self) -> None:
        self._rbs: set[str] = set()
        self._lock = threading.Lock()

    def add(self, rb: str) -> bool:
        with self._lock:
            if rb in self._rbs:
                return False
            self._rbs.add(rb)
            return True

    def discard(self, rb: str) -> None:
        with self._lock:
            self._rbs.discard(rb)

    def __contains__(self, rb: object) -> bool:
        with self._lock:
            return rb in self._rbs

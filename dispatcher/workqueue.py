"""Admission's work queue (RB numbers, de-duplicated, one RB on one worker at a time),
and the claim sets the loops share."""

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


class Claims:
    """A set shared between threads whose ``add`` says whether the item was new.

    Two uses: the RBs whose direct admission (``dispatcher.direct``) is between its
    Lease write and its Job create in this process (admission leaves them alone rather
    than void a Job that is about to exist); and the finished Jobs already offered to
    the outcome path (each once: the lifecycle discards one it gave up on for now, so
    the next resync offers it again).
    """

    def __init__(self) -> None:
        self._items: set[str] = set()
        self._lock = threading.Lock()

    def add(self, item: str) -> bool:
        with self._lock:
            if item in self._items:
                return False
            self._items.add(item)
            return True

    def discard(self, item: str) -> None:
        with self._lock:
            self._items.discard(item)

    def __contains__(self, item: object) -> bool:
        with self._lock:
            return item in self._items

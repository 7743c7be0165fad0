"""The daemon's one work queue, in controller-runtime's idiom.

Keys, not events, go on it: a key queued twice before a worker takes it runs once,
a key is never on two workers at once (queued again while a worker has it, it runs
again after ``done``), a reconciler asks to be called again with ``add_after``, and
a failing key backs off exponentially on its own without slowing the others.
"""

from __future__ import annotations

import heapq
import threading
import time

from dispatcher.keys import Key


class WorkQueue:
    def __init__(self, *, backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0) -> None:
        self._ready: dict[Key, None] = {}  # insertion-ordered, de-duplicated
        self._busy: set[Key] = set()
        self._delayed: list[tuple[float, int, Key]] = []  # (due, tie-break, key) heap
        self._due: dict[Key, float] = {}  # the earliest due time of each delayed key
        self._failures: dict[Key, int] = {}
        self._seq = 0
        self._closed = False
        self._cond = threading.Condition()
        self._initial = backoff_initial_s
        self._max = backoff_max_s

    def add(self, key: Key) -> None:
        with self._cond:
            # A delayed copy is dropped: every reconcile that wants another look asks
            # again, so the one run now stands for it.
            self._due.pop(key, None)
            self._ready[key] = None
            self._cond.notify()

    def add_after(self, key: Key, delay_s: float) -> None:
        """Queue ``key`` in ``delay_s`` (at once if it is due sooner anyway)."""
        if delay_s <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay_s
        with self._cond:
            if key in self._ready or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, key))
            self._cond.notify()

    def add_rate_limited(self, key: Key) -> float:
        """Queue ``key`` after its own backoff (doubling per failure); returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._initial * float(2**failures), self._max)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """``key`` succeeded: its next failure starts the backoff afresh."""
        with self._cond:
            self._failures.pop(key, None)

    def get(self, *, timeout: float) -> Key | None:
        """The next key no worker holds, or None after ``timeout`` or ``shutdown``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                self._promote_due(now)
                key = next((k for k in self._ready if k not in self._busy), None)
                if key is not None:
                    del self._ready[key]
                    self._busy.add(key)
                    return key
                wake = min(deadline, self._delayed[0][0]) if self._delayed else deadline
                if now >= deadline:
                    return None
                self._cond.wait(max(wake - now, 0.001))
            return None

    def done(self, key: Key) -> None:
        with self._cond:
            self._busy.discard(key)
            if key in self._ready:
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> set[Key]:
        """Keys queued now or later (for tests and diagnostics)."""
        with self._cond:
            return set(self._ready) | set(self._due)

    def _promote_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) == due:
                del self._due[key]
                self._ready[key] = None

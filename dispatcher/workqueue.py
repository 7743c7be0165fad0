"""The reconcilers' work queue, and the claim sets the loops share.

``WorkQueue`` has the semantics of client-go's workqueue that the reconcilers rely on:
a key queued twice is reconciled once; one key is never on two workers at once (one
queued again meanwhile waits for ``done``); ``add_after`` is a requeue-after; and
``retry`` requeues with per-key exponential backoff until ``forget``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]


class WorkQueue:
    def __init__(self, *, base_delay_s: float = 0.25, max_delay_s: float = 5.0,
                 clock: Clock = time.monotonic) -> None:
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._ready: dict[str, None] = {}  # insertion-ordered: oldest first
        self._busy: set[str] = set()
        self._later: list[tuple[float, int, str]] = []  # (due, tie-break, key), a heap
        self._seq = itertools.count()
        self._failures: dict[str, int] = {}
        self._shut = False
        self._cond = threading.Condition()

    def add(self, key: str) -> None:
        with self._cond:
            if not self._shut:
                self._ready[key] = None
                self._cond.notify()

    def add_after(self, key: str, delay_s: float) -> None:
        """Reconcile ``key`` again in ``delay_s`` (a wait that no watch event ends)."""
        if delay_s <= 0:
            self.add(key)
            return
        with self._cond:
            heapq.heappush(self._later, (self._clock() + delay_s, next(self._seq), key))
            self._cond.notify()  # a worker waiting for a later item must wake sooner

    def retry(self, key: str) -> float:
        """Requeue after a failure: 1, 2, 4... times the base delay up to the cap, per
        key, so one RB or Job failing again and again does not hold up the others."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self.base_delay_s * float(2 ** min(failures, 32)), self.max_delay_s)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        """The key was reconciled: its next failure starts the backoff again."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def get(self, *, timeout: float) -> str | None:
        """The next key no worker has, marked busy until ``done``; None on timeout or
        after ``shut_down``."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._shut:
                now = self._clock()
                self._promote(now)
                key = next((k for k in self._ready if k not in self._busy), None)
                if key is not None:
                    del self._ready[key]
                    self._busy.add(key)
                    return key
                wait = deadline - now
                if self._later:
                    wait = min(wait, self._later[0][0] - now)
                if deadline - now <= 0:
                    return None
                self._cond.wait(max(wait, 0.001))
            return None

    def done(self, key: str) -> None:
        with self._cond:
            self._busy.discard(key)
            if key in self._ready:
                self._cond.notify()

    def shut_down(self) -> None:
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    def _promote(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            self._ready[heapq.heappop(self._later)[2]] = None


class Claims:
    """A set shared between threads whose ``add`` says whether the item was new.

    Used for the RBs whose direct admission (``dispatcher.direct``) is between its
    Lease write and its Job create in this process: admission leaves them alone
    rather than void a Job that is about to exist.
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

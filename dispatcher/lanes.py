"""Per-RB lanes: the messages of one RB are handled one at a time, in arrival order.

Workers handle different RBs in parallel. Two runs of one RB handled at once could
reach the cluster in either order, and admission, which orders by the broker's
enqueue time among the Jobs it can see, would then start the later run first when
it saw that run's Job alone. Handling an RB's messages in order means each run's Job
exists (and is in the controller's view) before the next one of its RB is created.
A cancellation goes down its run's lane too, so it is handled after the run it names.

No I/O here: ``lane_of`` reads the RB from a body without validating it (that is
the dispatcher's job), and ``Lanes`` is a thread-safe scheduler of plain items.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Generic, TypeVar

from autoreduce_common.messages import MessageError, decode_body

T = TypeVar("T")


def lane_of(body: bytes, *, fallback: str) -> str:
    """The lane of a message: its RB number, or ``fallback`` (unique per message) when
    the body names none, so a message the dispatcher will reject blocks no RB."""
    try:
        rb = decode_body(body).get("rb_number")
    except MessageError:
        return f"message:{fallback}"
    if isinstance(rb, bool) or not isinstance(rb, int | str) or not str(rb).strip():
        return f"message:{fallback}"
    # The same normalisation as the message model, so "42" and 42 share a lane.
    return f"rb:{str(rb).strip()}"


class Lanes(Generic[T]):
    """FIFO per key; ``take`` hands out the oldest item whose key no worker holds."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._lanes: dict[str, deque[tuple[int, T]]] = {}
        self._held: set[str] = set()
        self._sequence = itertools.count()

    def put(self, key: str, item: T) -> None:
        with self._ready:
            self._lanes.setdefault(key, deque()).append((next(self._sequence), item))
            self._ready.notify()

    def take(self, *, timeout: float) -> tuple[str, T] | None:
        """The next item and its key, now held until ``done(key)``; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                key = self._oldest_free()
                if key is not None:
                    lane = self._lanes[key]
                    _, item = lane.popleft()
                    if not lane:
                        del self._lanes[key]
                    self._held.add(key)
                    return key, item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._ready.wait(left)

    def done(self, key: str) -> None:
        """The item taken under ``key`` is settled: the lane's next item may go."""
        with self._ready:
            self._held.discard(key)
            self._ready.notify_all()

    def pending(self) -> int:
        with self._ready:
            return sum(len(lane) for lane in self._lanes.values())

    def _oldest_free(self) -> str | None:
        free = [(lane[0][0], key) for key, lane in self._lanes.items() if key not in self._held]
        return min(free)[1] if free else None

"""The work queue's promises: de-duplication, one key on one worker, requeue-after
and per-key exponential backoff."""

from __future__ import annotations

import threading
import time

from dispatcher.keys import Key, Kind
from dispatcher.workqueue import WorkQueue

A, B = Key(Kind.RB, "1"), Key(Kind.RB, "2")


def test_a_key_queued_twice_before_it_is_taken_runs_once() -> None:
    queue = WorkQueue()
    queue.add(A)
    queue.add(A)
    assert queue.get(timeout=0) == A
    queue.done(A)
    assert queue.get(timeout=0) is None


def test_a_key_is_never_on_two_workers_and_runs_again_after_done() -> None:
    queue = WorkQueue()
    queue.add(A)
    assert queue.get(timeout=0) == A
    queue.add(A)  # an event while a worker has it
    queue.add(B)
    assert queue.get(timeout=0) == B  # others are not held up
    assert queue.get(timeout=0) is None
    queue.done(A)
    assert queue.get(timeout=0) == A


def test_add_after_waits_and_an_add_in_between_runs_at_once() -> None:
    queue = WorkQueue()
    queue.add_after(A, 0.15)
    assert queue.get(timeout=0.02) is None
    started = time.monotonic()
    assert queue.get(timeout=1) == A
    assert time.monotonic() - started > 0.05
    queue.done(A)
    queue.add_after(B, 30)
    queue.add(B)  # new information: now, and the delayed copy is dropped
    assert queue.get(timeout=0) == B
    queue.done(B)
    assert queue.pending() == set()


def test_backoff_doubles_per_failure_is_capped_and_reset_by_forget() -> None:
    queue = WorkQueue(backoff_initial_s=0.5, backoff_max_s=3.0)
    assert [queue.add_rate_limited(A) for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert queue.add_rate_limited(B) == 0.5  # per key
    queue.forget(A)
    assert queue.add_rate_limited(A) == 0.5


def test_shutdown_wakes_a_waiting_worker() -> None:
    queue = WorkQueue()
    got: list[Key | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get(timeout=30)))
    worker.start()
    queue.shutdown()
    worker.join(timeout=5)
    assert got == [None] and queue.closed

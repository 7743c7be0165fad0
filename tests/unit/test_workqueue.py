"""The reconcilers' work queue: de-duplication, one key on one worker, requeue-after and
per-key backoff (a fake clock: nothing here waits on time)."""

from __future__ import annotations

import threading

from dispatcher.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_queued_twice_is_taken_once() -> None:
    queue = WorkQueue()
    queue.add("a")
    queue.add("a")
    queue.add("b")
    assert queue.get(timeout=0) == "a"
    assert queue.get(timeout=0) == "b"
    assert queue.get(timeout=0) is None


def test_a_busy_key_waits_for_done() -> None:
    queue = WorkQueue()
    queue.add("a")
    assert queue.get(timeout=0) == "a"
    queue.add("a")  # changed again while a worker has it
    assert queue.get(timeout=0) is None
    queue.done("a")
    assert queue.get(timeout=0) == "a"


def test_add_after_falls_due_on_time() -> None:
    clock = Clock()
    queue = WorkQueue(clock=clock)
    queue.add_after("a", 5)
    assert queue.get(timeout=0) is None
    clock.now = 4.9
    assert queue.get(timeout=0) is None
    clock.now = 5.0
    assert queue.get(timeout=0) == "a"


def test_backoff_doubles_per_key_up_to_the_cap_and_forget_resets_it() -> None:
    queue = WorkQueue(base_delay_s=1, max_delay_s=5, clock=Clock())
    assert [queue.retry("a") for _ in range(5)] == [1, 2, 4, 5, 5]
    assert queue.retry("b") == 1  # per key
    assert queue.failures("a") == 5
    queue.forget("a")
    assert queue.retry("a") == 1


def test_a_waiting_worker_wakes_for_an_item_added_meanwhile() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get(timeout=10)))
    worker.start()
    queue.add_after("a", 0.05)  # real time: the worker's wait must shrink to this
    worker.join(timeout=5)
    assert got == ["a"]


def test_shut_down_releases_waiting_workers() -> None:
    queue = WorkQueue()
    got: list[str | None] = ["x"]
    worker = threading.Thread(target=lambda: got.__setitem__(0, queue.get(timeout=10)))
    worker.start()
    queue.shut_down()
    worker.join(timeout=5)
    assert got == [None] and not worker.is_alive()

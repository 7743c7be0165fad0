"""A run held back by the caps is admitted once a slot frees, whatever the thread timing.

The ``Admitter`` runs over a fake of our own ``Kube`` boundary, driven on two threads
the way the daemon drives it: a worker reconciling an RB, and another worker taking
the cap-slot key that the finish of the only running run queued.
"""

from __future__ import annotations

import threading
from typing import Any

from dispatcher.admission import Caps
from dispatcher.admitter import Admitter
from dispatcher.caches import JobCache, PodCache
from dispatcher.events import WaitingEvents
from dispatcher.keys import Key, Kind
from dispatcher.metrics import Metrics
from dispatcher.workqueue import WorkQueue
from tests.unit.daemon_harness import LABELS, run_job
from tests.unit.fake_kube import FakeKube

Obj = dict[str, Any]


class PausingCache(JobCache):
    """Pauses the worker that has just counted the running Jobs, until ``resume`` is set."""

    def __init__(self) -> None:
        super().__init__(LABELS)
        self.counted = threading.Event()
        self.resume = threading.Event()

    def running(self) -> list[Obj]:
        counted = super().running()
        self.counted.set()
        self.resume.wait(timeout=10)
        return counted


class TellingLock:
    """A lock that says when a second thread has to wait for it."""

    def __init__(self, contended: threading.Event) -> None:
        self._lock = threading.Lock()
        self._contended = contended

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self._contended.set()
            self._lock.acquire()

    def __exit__(self, *_: object) -> None:
        self._lock.release()


def admitter_over(kube: FakeKube, cache: JobCache, queue: WorkQueue,
                  metrics: Metrics | None = None) -> Admitter:
    pods = PodCache()
    pods.replace_all([])
    return Admitter(kube=kube, labels=LABELS, identity="test",  # type: ignore[arg-type]
                    caps=Caps(max_running=1, per_instrument={}), jobs=cache, pods=pods,
                    queue=queue, events=WaitingEvents(kube=kube),  # type: ignore[arg-type]
                    metrics=metrics or Metrics())


def test_a_slot_freed_while_a_worker_counts_the_caps_is_not_lost() -> None:
    """Run a1 of RB 1 finishes just after a worker counted the only slot taken for run
    b1 of RB 2 and before it marks RB 2 cap-blocked. RB 2 must still be queued again,
    and b1 admitted on that pass."""
    kube = FakeKube()
    running_a1 = kube.put_job(run_job("a1", "1"))
    waiting_b1 = kube.put_job(run_job("b1", "2", suspend=True))
    cache, queue = PausingCache(), WorkQueue()
    cache.replace_all([running_a1, waiting_b1])
    admitter = admitter_over(kube, cache, queue)
    # The other worker either frees the slot unhindered or has to wait for the caps
    # lock: both are the moments the counting worker may go on.
    other_went_by = threading.Event()
    admitter._caps_lock = TellingLock(other_went_by)  # type: ignore[assignment]

    def finish_and_take_the_cap_slot_key() -> None:
        cache.counted.wait(timeout=10)
        cache.upsert(kube.put_job(run_job("a1", "1", succeeded=True)))
        admitter.wake_cap_blocked()
        other_went_by.set()

    other = threading.Thread(target=finish_and_take_the_cap_slot_key)
    other.start()
    worker = threading.Thread(target=admitter.reconcile, args=("2",))
    worker.start()
    other_went_by.wait(timeout=10)
    cache.resume.set()
    worker.join(timeout=10)
    other.join(timeout=10)
    admitter.wake_cap_blocked()  # the cap-slot key, had the finish come after the mark

    assert Key(Kind.RB, "2") in queue.pending(), "RB 2 was cap-blocked and never queued again"
    admitter.reconcile("2")
    assert kube.jobs["b1"]["spec"]["suspend"] is False, "b1 should have been admitted"


def test_an_admission_is_counted_in_the_metrics() -> None:
    kube = FakeKube()
    waiting = kube.put_job(run_job("a1", "1", suspend=True))
    cache = JobCache(LABELS)
    cache.replace_all([waiting])
    metrics = Metrics()
    admitter_over(kube, cache, WorkQueue(), metrics).reconcile("1")
    assert kube.jobs["a1"]["spec"]["suspend"] is False
    assert metrics.registry.get_sample_value("autoreduce_runs_admitted_total") == 1

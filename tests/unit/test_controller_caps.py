"""A run held back by the caps is admitted once a slot frees, whatever the thread timing.

The Controller is built with a fake of our own ``Kube`` boundary and driven on two
threads the way the daemon drives it: an admission worker reconciling an RB and the
Job watch delivering the finish that frees the only slot.
"""

from __future__ import annotations

import threading
from typing import Any

from dispatcher.admission import Caps
from dispatcher.controller import Controller
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache
from dispatcher.kube import AlreadyExists, NotFound
from dispatcher.metrics import Metrics

LABELS = Labels("autoreduce.io")
Obj = dict[str, Any]


def job(name: str, rb: str, *, suspend: bool, rv: int, finished: bool = False) -> Obj:
    conditions = [{"type": "Complete", "status": "True"}] if finished else []
    return {
        "metadata": {"name": name, "resourceVersion": str(rv),
                     "labels": {LABELS.managed: "true", LABELS.key("rb-number"): rb}},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions},
    }  # fmt: skip


class FakeKube:
    """The calls admission makes, against in-memory Leases and Jobs."""

    def __init__(self, jobs: list[Obj]) -> None:
        self.jobs = {j["metadata"]["name"]: j for j in jobs}
        self.leases: dict[str, Obj] = {}

    def get_lease(self, name: str) -> Obj | None:
        return self.leases.get(name)

    def create_lease(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        if name in self.leases:
            raise AlreadyExists(f"Lease {name}", status=409)
        self.leases[name] = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return self.leases[name]

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        if name not in self.jobs:
            raise NotFound(f"Job {name}", status=404)
        known = self.jobs[name]
        rv = int(known["metadata"]["resourceVersion"]) + 1
        self.jobs[name] = {**known, "metadata": {**known["metadata"], "resourceVersion": str(rv)},
                           "spec": {**known["spec"], "suspend": suspend}}  # fmt: skip
        return self.jobs[name]

    def get_job(self, name: str) -> Obj | None:
        return self.jobs.get(name)

    def record_event(self, **_: Any) -> None:
        pass


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


def queued(controller: Controller) -> set[str]:
    found = set()
    while (rb := controller.queue.get(timeout=0)) is not None:
        found.add(rb)
        controller.queue.done(rb)
    return found


def test_a_slot_freed_while_a_worker_counts_the_caps_is_not_lost() -> None:
    """The watch thread frees the only slot (run a1 of RB 1 finishes) just after a worker
    counted it taken for run b1 of RB 2 and before the worker marks RB 2 cap-blocked.
    RB 2 must still be queued again, and b1 admitted on that pass."""
    running_a1 = job("a1", "1", suspend=False, rv=1)
    waiting_b1 = job("b1", "2", suspend=True, rv=1)
    kube = FakeKube([running_a1, waiting_b1])
    cache = PausingCache()
    cache.replace_all([running_a1, waiting_b1])
    controller = Controller(kube=kube, labels=LABELS, identity="test",  # type: ignore[arg-type]
                            caps=Caps(max_running=1, per_instrument={}), resync_seconds=60,
                            cache=cache)
    controller.pods.replace_all([])
    # The watch thread either finishes its event or has to wait for the caps lock:
    # both are the moments the worker may go on.
    watch_went_by = threading.Event()
    controller.slots.lock = TellingLock(watch_went_by)  # type: ignore[assignment]

    def watch() -> None:
        cache.counted.wait(timeout=10)
        controller.watch.on_event("MODIFIED", job("a1", "1", suspend=False, rv=2, finished=True))
        watch_went_by.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker = threading.Thread(target=controller.reconcile, args=("2",))
    worker.start()
    watch_went_by.wait(timeout=10)
    cache.resume.set()
    worker.join(timeout=10)
    watcher.join(timeout=10)

    assert "2" in queued(controller), "RB 2 was cap-blocked and never queued again"
    controller.reconcile("2")
    assert not kube.jobs["b1"]["spec"]["suspend"], "b1 should have been admitted"


def test_an_admission_is_counted_in_the_metrics_given_or_in_a_private_default() -> None:
    given = Metrics()
    for metrics in (given, None):
        waiting = job("a1", "1", suspend=True, rv=1)
        kube = FakeKube([waiting])
        controller = Controller(kube=kube, labels=LABELS, identity="test",  # type: ignore[arg-type]
                                caps=Caps(max_running=1, per_instrument={}), resync_seconds=60,
                                metrics=metrics)
        controller.cache.replace_all([waiting])
        controller.pods.replace_all([])
        controller.reconcile("1")
        assert not kube.jobs["a1"]["spec"]["suspend"]
        assert controller.metrics.registry.get_sample_value("autoreduce_runs_admitted_total") == 1
    assert controller.metrics is not given  # the default is the controller's own

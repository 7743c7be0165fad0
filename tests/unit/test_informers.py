"""A watch that expires (410 Gone), dies mid-stream or fails to start costs a re-list,
never a missed change: every key a change touched is queued again from the list."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from dispatcher.caches import JobCache
from dispatcher.informers import Informer, JobStore
from dispatcher.keys import Key, Kind
from dispatcher.kube import Gone, Unavailable, WatchEvent
from dispatcher.workqueue import WorkQueue
from tests.unit.daemon_harness import LABELS, run_job
from tests.unit.fake_kube import FakeKube


def test_expired_dying_and_refused_watches_are_followed_by_a_relist() -> None:
    kube = FakeKube()
    kube.put_job(run_job("run-a", "1", suspend=True))
    finished_b = run_job("run-b", "2", succeeded=True)
    lists = 0
    list_jobs = kube.list_jobs

    def counting_list(**kwargs):  # type: ignore[no-untyped-def]
        nonlocal lists
        lists += 1
        return list_jobs(**kwargs)

    kube.list_jobs = counting_list  # type: ignore[method-assign]

    def dies_after_one_event() -> Iterator[WatchEvent]:
        yield WatchEvent(kind="ADDED", obj=kube.put_job(finished_b))
        raise Unavailable("watch stream reset")

    kube.fail_next("watch_jobs", Gone("watch Jobs: too old", status=410))
    kube.job_watch.append(dies_after_one_event)
    kube.fail_next("watch_jobs", Unavailable("connection refused"))  # the third start
    queue, stop = WorkQueue(), threading.Event()
    cache = JobCache(LABELS)
    informer = Informer(name="Job", store=JobStore(kube=kube, labels=LABELS, cache=cache),  # type: ignore[arg-type]
                        queue=queue, stop=stop, resync_s=300)
    thread = threading.Thread(target=informer.run)
    thread.start()
    deadline = time.monotonic() + 10
    while lists < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=10)
    assert lists >= 4  # the first list, then one after each failed watch
    assert {Key(Kind.RB, "1"), Key(Kind.RB, "2"), Key(Kind.JOB, "run-b"),
            Key(Kind.CAP_SLOT)} <= queue.pending()
    assert cache.synced.is_set() and cache.get("run-b") is not None

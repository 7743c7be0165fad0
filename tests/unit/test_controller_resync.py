"""The safety-net resync looks at every RB and finished Job again from the cache; it
does not re-list (at 50,000 waiting runs a re-list is seconds of CPU and twice the
cache in memory). Real ``Controller`` over a fake of our own ``Kube`` boundary."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from dispatcher.admission import Caps
from dispatcher.controller import Controller
from dispatcher.identity import Labels
from tests.harness.fake_kube import FakeKube

LABELS = Labels("autoreduce.io")


class QuietWatchKube(FakeKube):
    """A watch that ends at once with no events (as after its timeout), counted."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0
        self.watches = 0

    def list_jobs(self, *, selector: str, **_: Any) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return super().list_jobs(selector=selector)

    def watch_jobs(self, **_: Any) -> Iterator[Any]:
        self.watches += 1
        time.sleep(0.01)
        return iter(())


def _job(name: str, *, rb: str, condition: str | None = None) -> dict[str, Any]:
    status = {"conditions": [{"type": condition, "status": "True"}]} if condition else {}
    return {"metadata": {"name": name, "resourceVersion": "1",
                         "labels": {"autoreduce.io/rb-number": rb}},
            "spec": {"suspend": condition is None}, "status": status}  # fmt: skip


class Recorder:
    """An observer that notes what it is told."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str]] = []

    def job_changed(self, kind: str, job: dict[str, Any]) -> None:
        self.jobs.append((kind, job["metadata"]["name"]))

    def pod_changed(self, view: Any, deleted: bool) -> None:
        pass


def test_resync_replays_the_cache_without_listing_again() -> None:
    kube = QuietWatchKube()
    recorder = Recorder()
    controller = Controller(
        kube=kube,  # type: ignore[arg-type]
        labels=LABELS,
        identity="t",
        caps=Caps(None, {}),
        resync_seconds=0.05,
        observers=[recorder],
    )
    controller.cache.upsert(_job("waits", rb="1"))
    controller.cache.upsert(_job("done", rb="2", condition="Complete"))
    follower = threading.Thread(target=controller.watch._follow, args=("1",), daemon=True)
    follower.start()
    deadline = time.monotonic() + 5
    while not recorder.jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    controller._stop.set()
    follower.join(5)
    assert {("SYNC", "waits"), ("SYNC", "done")} <= set(recorder.jobs)  # from the cache
    assert kube.lists == 0 and kube.watches > 1  # the watch went on; nothing re-listed
    queued = {controller.queue.get(timeout=0.1), controller.queue.get(timeout=0.1)}
    assert queued == {"1", "2"}  # every RB is looked at again

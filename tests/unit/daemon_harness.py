"""The real ``dispatcher.runtime.Daemon`` over a fake of our own ``Kube`` and an
in-memory transport, driven one step at a time: lists and watch events are applied
by the test, and keys are reconciled on the test's thread until the queue is quiet.
"""

from __future__ import annotations

import json
import time
from typing import Any

from autoreduce_common.pod_contract import MESSAGE_KEY

from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels
from dispatcher.manifests import load_template
from dispatcher.runtime import Daemon
from dispatcher.workqueue import WorkQueue
from tests.unit.fake_kube import FakeKube
from tests.unit.memory_transport import MemoryTransport

Obj = dict[str, Any]
LABELS = Labels("autoreduce.io")
SETTINGS: dict[str, Any] = {"image_pull_grace_s": 0.2, "retries": {"mode": "upstream"}}


def run_job(name: str, rb: str, *, suspend: bool = False, failed: bool = False,
            succeeded: bool = False, annotations: dict[str, str] | None = None) -> Obj:
    conditions = []
    if failed:
        conditions.append({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"})
    if succeeded:
        conditions.append({"type": "Complete", "status": "True"})
    return {
        "kind": "Job",
        "metadata": {
            "name": name, "uid": f"uid-{name}", "annotations": dict(annotations or {}),
            "labels": {LABELS.managed: "true", LABELS.key("rb-number"): rb,
                       LABELS.key("instrument"): "WISH", LABELS.key("run-number"): "1",
                       LABELS.key("run-version"): "0"},
        },
        "spec": {"suspend": suspend, "template": {"spec": {"containers": [
            {"name": "runner", "resources": {"limits": {"memory": "1Gi"}}}]}}},
        "status": {"conditions": conditions},
    }  # fmt: skip


def run_pod(job: str, rb: str, *, phase: str = "Running", terminated: Obj | None = None,
            waiting: str | None = None, finalized: bool = True) -> Obj:
    state: Obj = {"running": {}}
    if terminated is not None:
        state = {"terminated": terminated}
    if waiting is not None:
        state = {"waiting": {"reason": waiting, "message": "cannot pull"}}
    return {
        "metadata": {
            "name": f"{job}-pod", "finalizers": [LABELS.pod_finalizer] if finalized else [],
            "labels": {LABELS.managed: "true", "batch.kubernetes.io/job-name": job,
                       LABELS.key("rb-number"): rb},
        },
        "status": {"phase": phase, "containerStatuses": [{"name": "runner", "state": state}]},
    }  # fmt: skip


def message(name: str, rb: str) -> Obj:
    body = {"instrument": "WISH", "rb_number": int(rb), "run_number": 1, "run_version": 0,
            "data": "/archive/WISH1.nxs", "reduction_script": "print(1)", "facility": "ISIS"}
    return {"metadata": {"name": name}, "data": {MESSAGE_KEY: json.dumps(body)}}


class Harness:
    def __init__(self, kube: FakeKube | None = None, **settings: Any) -> None:
        self.kube = kube or FakeKube()
        self.broker = MemoryTransport()
        self.outcomes = MemoryTransport()
        config = DispatcherSettings.model_validate({**SETTINGS, **settings})
        # Backoff short enough to see several retries within a test.
        self.queue = WorkQueue(backoff_initial_s=0.01, backoff_max_s=0.05)
        self.daemon = Daemon(settings=config, kube=self.kube,  # type: ignore[arg-type]
                             template=load_template(config.jobs.template_path),
                             client=self.broker, outcome_client=self.outcomes, queue=self.queue)
        self.jobs = self.daemon.job_informer.store
        self.pods = self.daemon.pod_informer.store

    def relist(self) -> None:
        """What the informers do on start and after a watch gap."""
        for store in (self.jobs, self.pods):
            for key in store.replace(store.list_all()[0]):
                self.queue.add(key)

    def event(self, kind: str, obj: Obj, *, pod: bool = False) -> None:
        for key in (self.pods if pod else self.jobs).apply(kind, obj):
            self.queue.add(key)

    def settle(self, *, within: float = 2.0) -> None:
        """Reconcile on this thread until no key is due within ``within`` seconds."""
        deadline = time.monotonic() + within
        while (key := self.queue.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
            self.daemon.workers.process(key)
            if not self.queue.pending():
                return

    def posted(self, queue: str) -> list[Obj]:
        return [json.loads(s.body) for s in self.outcomes.to(queue)]

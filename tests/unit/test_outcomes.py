"""The outcome reconciler, keyed by Job, over fakes of our own boundaries (``Kube``, the
reporter): one outcome per finished run, retries with backoff when the broker or API
is away, pods released only once the outcome is settled, stuck pods failed after the
grace. The real-stack proof is tests/integration/test_lifecycle.py and the fault suite.
"""

from __future__ import annotations

from typing import Any

import pytest
from autoreduce_common.messages import Outcome
from autoreduce_common.stomp_client import BrokerError

from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache
from dispatcher.jobwatch import SYNC
from dispatcher.metrics import Metrics
from dispatcher.outcome_state import OUTCOME_KEY, OutcomeState
from dispatcher.outcomes import Outcomes
from dispatcher.pods import PodCache, pod_view
from dispatcher.retries import Retries, RetryPolicy
from dispatcher.settle import Settler
from tests.harness.fake_kube import FakeKube

LABELS = Labels("autoreduce.io")
Obj = dict[str, Any]
GRACE_S = 10.0


class FakeReporter:
    """Our transport's reporting side, in memory; ``down`` posts fail as the broker's."""

    def __init__(self) -> None:
        self.posts: list[tuple[Outcome, str, bool]] = []  # (kind, outcome id, possible repeat)
        self.sent: list[dict[str, Any]] = []
        self.down = 0

    def post(self, outcome: Outcome, body: Obj, *, outcome_id: str,
             possible_repeat: bool = False) -> None:
        if self.down:
            self.down -= 1
            raise BrokerError("broker away")
        self.posts.append((outcome, outcome_id, possible_repeat))

    def send(self, **options: Any) -> None:
        self.sent.append(options)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """One dispatcher's outcome side: the reconciler, its caches and its boundaries."""

    def __init__(self, kube: FakeKube, reporter: FakeReporter, clock: Clock) -> None:
        self.kube = kube
        self.jobs = JobCache(LABELS)
        self.pods = PodCache()
        settler = Settler(
            kube=kube,  # type: ignore[arg-type]
            labels=LABELS,
            reporter=reporter,  # type: ignore[arg-type]
            retries=Retries(policy=RetryPolicy(by_dispatcher=False, max_attempts=1, delay_s=0),
                            kube=kube, labels=LABELS, reporter=reporter,  # type: ignore[arg-type]
                            pending_queue="/queue/ReductionPending"),
            pods=self.pods,
            metrics=Metrics(),
            image_pull_grace_s=GRACE_S,
        )
        self.outcomes = Outcomes(settler=settler, jobs=self.jobs, pods=self.pods,
                                 stuck_grace_s=GRACE_S, clock=clock)

    def sees(self, kind: str = "MODIFIED") -> None:
        """The watches deliver the fake API's current Jobs and pods."""
        for pod in self.kube.of_kind("Pod").values():
            view = pod_view(pod, labels=LABELS)
            self.pods.upsert(view)
            self.outcomes.pod_changed(view, False)
        for job in self.kube.of_kind("Job").values():
            self.jobs.upsert(job)
            self.outcomes.job_changed(kind, job)

    def drain(self) -> int:
        """Run every queued key that is due now; how many were run."""
        done = 0
        while (name := self.outcomes.queue.get(timeout=0)) is not None:
            self.outcomes.process(name)
            done += 1
        return done


def _job(kube: FakeKube, name: str, *, condition: str | None) -> None:
    kube.create_job({
        "metadata": {"name": name, "labels": {
            LABELS.managed: "true", LABELS.key("rb-number"): "1",
            LABELS.key("instrument"): "MARI", LABELS.key("run-number"): "7",
            LABELS.key("run-version"): "0"}},
        "spec": {"suspend": False, "template": {"spec": {"containers": []}}},
    })  # fmt: skip
    if condition:
        kube.finish(name, condition=condition)


def _pod(kube: FakeKube, job: str, *, exit_code: int | None = None,
         waiting: str | None = None) -> None:
    container: Obj = {"name": "runner"}
    if exit_code is not None:
        container["state"] = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    if waiting is not None:
        container["state"] = {"waiting": {"reason": waiting, "message": "no such image"}}
    kube.add_pod({
        "metadata": {"name": f"{job}-pod", "finalizers": [LABELS.pod_finalizer], "labels": {
            "batch.kubernetes.io/job-name": job, LABELS.managed: "true",
            LABELS.key("rb-number"): "1"}},
        "status": {"phase": "Failed" if exit_code else "Pending",
                   "containerStatuses": [container]},
    })  # fmt: skip


def _finalized(kube: FakeKube, job: str) -> bool:
    return LABELS.pod_finalizer in kube.of_kind("Pod")[f"{job}-pod"]["metadata"]["finalizers"]


def _state(kube: FakeKube, job: str) -> str | None:
    annotations = kube.of_kind("Job")[job]["metadata"].get("annotations") or {}
    return annotations.get(LABELS.key(OUTCOME_KEY))


@pytest.fixture
def world() -> tuple[FakeKube, FakeReporter, Clock]:
    return FakeKube(), FakeReporter(), Clock()


def test_a_failed_run_gets_one_error_however_often_it_is_seen(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition="Failed")
    _pod(kube, "j1", exit_code=2)
    node.sees()
    node.drain()
    assert reporter.posts == [(Outcome.ERROR, "j1", False)]
    assert _state(kube, "j1") == OutcomeState.DONE
    assert not _finalized(kube, "j1")  # released once the outcome was settled
    for kind in ("MODIFIED", SYNC, "MODIFIED"):
        node.sees(kind)
        node.drain()
    assert len(reporter.posts) == 1


def test_two_replicas_post_one_outcome(world: Any) -> None:
    kube, reporter, clock = world
    first, second = Node(kube, reporter, clock), Node(kube, reporter, clock)
    _job(kube, "j1", condition="Failed")
    _pod(kube, "j1", exit_code=2)
    first.sees()
    second.sees()  # both told before either acted: the claim's compare-and-swap decides
    first.drain()
    second.drain()
    assert reporter.posts == [(Outcome.ERROR, "j1", False)]


def test_a_broker_outage_is_retried_with_backoff_and_the_recorded_verdict_posted(
        world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition="Failed")
    _pod(kube, "j1", exit_code=2)
    reporter.down = 2
    node.sees()
    assert node.drain() == 1  # claimed, then the post failed: requeued for later
    assert _state(kube, "j1") == OutcomeState.HANDLING and _finalized(kube, "j1")
    assert node.drain() == 0  # not before its backoff
    clock.now += 1.0
    assert node.drain() == 1  # the second failure doubles the wait
    clock.now += 1.0
    assert node.drain() == 0
    clock.now += 1.0
    assert node.drain() == 1
    # What was decided before the outage, marked as a possible repeat (it may have
    # reached the broker before the error), and nothing decided anew.
    assert reporter.posts == [(Outcome.ERROR, "j1", True)]
    assert _state(kube, "j1") == OutcomeState.DONE and not _finalized(kube, "j1")
    assert node.outcomes.queue.failures("j1") == 0  # forgotten once settled


def test_a_succeeded_run_posts_nothing_and_lets_its_pod_go(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition="Complete")
    _pod(kube, "j1", exit_code=0)
    kube.objects[("Pod", "j1-pod")]["status"]["phase"] = "Succeeded"
    node.sees()
    node.drain()
    assert reporter.posts == [] and not _finalized(kube, "j1")


def test_a_stopped_pod_waits_for_its_jobs_verdict(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition=None)  # the Job controller has not marked it yet
    _pod(kube, "j1", exit_code=2)
    node.sees()
    node.drain()
    assert _finalized(kube, "j1") and reporter.posts == []  # its only record stays
    kube.finish("j1", condition="Failed")
    node.sees()
    node.drain()
    assert reporter.posts == [(Outcome.ERROR, "j1", False)] and not _finalized(kube, "j1")


def test_pods_that_outlived_their_job_are_released(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _pod(kube, "gone", exit_code=2)
    node.sees()
    node.drain()
    assert not _finalized(kube, "gone") and reporter.posts == []


def test_a_stuck_pod_fails_its_run_after_the_grace_not_before(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition=None)
    _pod(kube, "j1", waiting="ImagePullBackOff")
    node.sees()
    node.drain()
    assert reporter.posts == []
    clock.now += GRACE_S - 1
    node.sees()  # more pod events meanwhile do not restart the grace
    node.drain()
    assert reporter.posts == []
    clock.now += 1
    assert node.drain() == 1  # the requeue-after fell due
    assert reporter.posts == [(Outcome.ERROR, "j1", False)]
    assert "j1" not in kube.of_kind("Job")  # stopped


def test_a_cancelled_run_is_settled_once_its_pod_has_stopped(world: Any) -> None:
    kube, reporter, clock = world
    node = Node(kube, reporter, clock)
    _job(kube, "j1", condition=None)
    _pod(kube, "j1", waiting="ContainerCreating")
    kube.objects[("Pod", "j1-pod")]["status"]["phase"] = "Running"
    kube.annotate_job("j1", {LABELS.key(OUTCOME_KEY): OutcomeState.CANCELLING})
    node.sees()
    node.drain()
    assert reporter.posts == []  # still stopping
    kube.objects[("Pod", "j1-pod")]["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": "runner", "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}]}
    node.sees()
    node.drain()
    assert reporter.posts == [(Outcome.ERROR, "j1", False)]
    assert not _finalized(kube, "j1")

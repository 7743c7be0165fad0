"""The daemon's reconcilers, without the stack: the real ``Daemon`` over a fake of our
own ``Kube`` and an in-memory transport (``daemon_harness``). Each test names the
promise it holds: one outcome per run, one run per RB, nothing lost to an error.
The real-stack tests (tests/integration, tests/faults) remain the integration proof.
"""

from __future__ import annotations

import time

from autoreduce_common.broker_settings import QueueNames
from autoreduce_common.pod_contract import POSSIBLE_REPEAT_HEADER

from dispatcher import failures
from dispatcher.keys import Key, Kind
from dispatcher.kube import Conflict, Unauthorized, Unavailable
from dispatcher.outcome_state import OUTCOME_KEY, VERDICT_KEY, OutcomeState
from tests.unit.daemon_harness import LABELS, Harness, message, run_job, run_pod

QUEUES = QueueNames()
OOM = {"reason": "OOMKilled", "exitCode": 137}


def failed_run(h: Harness, name: str = "run-a", rb: str = "1") -> None:
    h.kube.put_job(run_job(name, rb, failed=True))
    h.kube.put_pod(run_pod(name, rb, phase="Failed", terminated=OOM))
    h.kube.config_maps[name] = message(name, rb)


def outcome_of(h: Harness, name: str = "run-a") -> str | None:
    return (h.kube.jobs[name]["metadata"].get("annotations") or {}).get(LABELS.key(OUTCOME_KEY))


def test_a_failed_run_gets_one_outcome_however_often_its_key_is_reconciled() -> None:
    h = Harness()
    failed_run(h)
    h.relist()
    h.settle()
    for _ in range(5):  # watch echoes of our own writes, re-lists, a restart's re-list
        h.queue.add(Key(Kind.JOB, "run-a"))
        h.relist()
        h.settle()
    errors = h.posted(QUEUES.error)
    assert len(errors) == 1 and "memory" in errors[0]["message"], errors
    assert outcome_of(h) == OutcomeState.DONE
    assert h.kube.pods["run-a-pod"]["metadata"]["finalizers"] == []  # released


def test_an_unconfirmed_outcome_send_backs_off_and_is_posted_once() -> None:
    h = Harness()
    failed_run(h)
    h.outcomes.fail_sends = 2  # the broker does not confirm twice
    h.relist()
    h.settle()
    assert len(h.posted(QUEUES.error)) == 1
    assert outcome_of(h) == OutcomeState.DONE
    # The claim was recorded before the first send: the retries post that same verdict.
    sent = h.outcomes.to(QUEUES.error)[0]
    assert sent.headers.get(POSSIBLE_REPEAT_HEADER) == "true"


def test_a_restart_between_send_and_done_resends_the_recorded_verdict_as_a_repeat() -> None:
    h = Harness()
    failed_run(h)
    verdict = failures.Verdict(False, "OOMKilled", "recorded before the crash", transient=False)
    h.kube.annotate_job("run-a", {LABELS.key(OUTCOME_KEY): OutcomeState.HANDLING,
                                  LABELS.key(VERDICT_KEY): failures.render_verdict(verdict)})
    h.relist()  # a new process: it knows nothing but what the API holds
    h.settle()
    errors = h.outcomes.to(QUEUES.error)
    assert [e.headers.get(POSSIBLE_REPEAT_HEADER) for e in errors] == ["true"]
    assert h.posted(QUEUES.error)[0]["message"] == "recorded before the crash"
    assert outcome_of(h) == OutcomeState.DONE


def test_a_claim_lost_to_another_replica_is_not_posted_again() -> None:
    h = Harness()
    failed_run(h)
    h.relist()
    # Another replica claims the Job between our read and our claim (our cache is behind).
    verdict = failures.Verdict(False, "OOMKilled", "theirs", transient=False)
    h.kube.annotate_job("run-a", {LABELS.key(OUTCOME_KEY): OutcomeState.HANDLING,
                                  LABELS.key(VERDICT_KEY): failures.render_verdict(verdict)})
    h.settle()
    assert h.posted(QUEUES.error) == []  # theirs to post; never two verdicts


def test_a_conflict_on_the_claim_without_a_rival_verdict_claims_again() -> None:
    h = Harness()
    failed_run(h)
    h.relist()
    h.kube.fail_next("annotate_job", Conflict("Job run-a", status=409))
    h.settle()
    assert len(h.posted(QUEUES.error)) == 1 and outcome_of(h) == OutcomeState.DONE


def test_a_succeeded_run_costs_no_write_but_the_pod_release() -> None:
    h = Harness()
    h.kube.put_job(run_job("run-a", "1", succeeded=True))
    h.kube.put_pod(run_pod("run-a", "1", phase="Succeeded", terminated={"exitCode": 0}))
    h.relist()
    h.settle()
    assert h.kube.writes == [("release Pod", "run-a-pod")]
    assert h.outcomes.sent == []


def test_the_next_run_of_an_rb_is_admitted_only_once_the_last_pod_has_stopped() -> None:
    h = Harness()
    h.kube.put_job(run_job("run-a", "1", succeeded=True))
    h.kube.put_pod(run_pod("run-a", "1", phase="Running"))  # still stopping
    h.kube.put_job(run_job("run-b", "1", suspend=True))
    h.relist()
    h.settle()
    assert h.kube.jobs["run-b"]["spec"]["suspend"] is True
    stopped = h.kube.put_pod(run_pod("run-a", "1", phase="Succeeded", terminated={"exitCode": 0}))
    h.event("MODIFIED", stopped, pod=True)
    h.settle()
    assert h.kube.jobs["run-b"]["spec"]["suspend"] is False


def test_a_401_during_admission_backs_off_and_admits_once_credentials_work() -> None:
    h = Harness()
    h.kube.put_job(run_job("run-a", "1", suspend=True))
    h.kube.fail_next("create_lease", Unauthorized("create Lease", status=401),
                     Unavailable("create Lease: connection refused"))
    h.relist()
    h.settle()
    assert h.kube.jobs["run-a"]["spec"]["suspend"] is False
    assert len([w for w in h.kube.writes if w[0] == "create Lease"]) == 1


def test_two_rbs_are_admitted_in_parallel_but_one_rb_never_twice() -> None:
    h = Harness()
    for name, rb in (("run-a", "1"), ("run-b", "1"), ("run-c", "2")):
        h.kube.put_job(run_job(name, rb, suspend=True))
    h.relist()
    h.settle()
    running = sorted(n for n, j in h.kube.jobs.items() if not j["spec"]["suspend"])
    assert running in (["run-a", "run-c"], ["run-b", "run-c"])


def test_a_pod_that_cannot_pull_its_image_fails_the_run_after_the_grace() -> None:
    h = Harness(image_pull_grace_s=0.2)
    h.kube.put_job(run_job("run-a", "1"))
    h.kube.put_pod(run_pod("run-a", "1", phase="Pending", waiting="ImagePullBackOff"))
    h.kube.config_maps["run-a"] = message("run-a", "1")
    h.relist()
    started = time.monotonic()
    h.settle(within=0.05)
    assert h.posted(QUEUES.error) == []  # within the grace: a requeue-after, no poll
    assert Key(Kind.JOB, "run-a") in h.queue.pending()
    h.settle(within=1.0)
    errors = h.posted(QUEUES.error)
    assert len(errors) == 1 and "ImagePullBackOff" in errors[0]["message"]
    assert time.monotonic() - started >= 0.2
    assert "run-a" not in h.kube.jobs  # deleted, so it stops holding its RB


def test_a_cancelled_running_run_waits_for_its_pod_then_posts_the_cancellation() -> None:
    h = Harness()
    h.kube.put_job(run_job("run-a", "1", annotations={LABELS.key(OUTCOME_KEY):
                                                       OutcomeState.CANCELLING}))
    h.kube.put_pod(run_pod("run-a", "1", phase="Running"))
    h.kube.config_maps["run-a"] = message("run-a", "1")
    h.relist()
    h.settle()
    assert h.posted(QUEUES.error) == []  # its runner may still post: wait for the pod
    stopped = h.kube.put_pod(run_pod("run-a", "1", phase="Failed",
                                     terminated={"exitCode": 143, "reason": "Error"}))
    h.event("MODIFIED", stopped, pod=True)
    h.settle()
    errors = h.posted(QUEUES.error)
    assert [e["message"] for e in errors] == ["Run cancelled while reducing"]


def test_a_pod_whose_job_is_gone_is_released_after_the_api_confirms_it() -> None:
    h = Harness()
    h.kube.put_pod(run_pod("run-gone", "1", phase="Failed", terminated=OOM))
    h.relist()
    h.settle()
    assert h.kube.pods["run-gone-pod"]["metadata"]["finalizers"] == []
    assert h.outcomes.sent == []  # no Job, no message to answer: nothing posted

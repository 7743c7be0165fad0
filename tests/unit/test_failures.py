"""Why a run ended, read from its Job and Pod status: the verdict that decides the
ReductionError posted on a run's behalf and whether it is retried (pure).

Termination messages are written with the shared ``pod_contract.TerminationReport``,
the same code the runner writes them with, so both sides of that contract are tested
together.
"""

from __future__ import annotations

from typing import Any

import pytest
from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import ExitCode, Stage, TerminationReport

from dispatcher.failures import (
    Verdict,
    classify,
    parse_verdict,
    render_verdict,
    runner_report,
    stuck_reason,
)
from dispatcher.reporting import error_body

Obj = dict[str, Any]
EVICTED = "The node was low on resource: memory. "
SIGTERM_NOTE = "not posted: stopped by SIGTERM; Reduction cancelled"


def job(*, failed: str | None = None, deadline: int = 300, memory: str = "200Mi",
        job_deadline: bool = False) -> Obj:
    """A Failed Job as the Job controller leaves it (``failed``: the condition's reason).
    The time limit is the pod template's, as our Jobs set it, or (``job_deadline``) the
    Job's own, as Jobs of earlier versions did."""
    conditions = [{"type": "Failed", "status": "True", "reason": failed,
                   "message": f"Job failed: {failed}"}] if failed else []
    pod_spec: Obj = {"containers": [
        {"name": "runner", "resources": {"limits": {"memory": memory}}}]}
    spec: Obj = {"template": {"spec": pod_spec}}
    (spec if job_deadline else pod_spec)["activeDeadlineSeconds"] = deadline
    return {"metadata": {"name": "red-wish-1-v0-abc"}, "spec": spec,
            "status": {"conditions": conditions}}  # fmt: skip


def pod(*, code: int | None = None, reason: str = "Error", message: str | None = None,
        phase_reason: str | None = None, phase_message: str = "",
        waiting: tuple[str, str] | None = None) -> Obj:
    """A runner pod: terminated with ``code`` (and termination ``message``), or waiting."""
    state: Obj = {"running": {}}
    if code is not None:
        state = {"terminated": {"exitCode": code, "reason": reason,
                                **({"message": message} if message is not None else {})}}
    elif waiting is not None:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    status: Obj = {"containerStatuses": [{"name": "runner", "state": state}]}
    if phase_reason:
        status.update(reason=phase_reason, message=phase_message)
    return {"metadata": {"name": "red-wish-1-v0-abc-x7k2p"}, "status": status}


def said(*, outcome: Outcome | None, posted: bool, retry_in: int | None = None,
         message: str = "") -> str:
    stage = Stage.POSTED if posted else (Stage.DECIDED if outcome else Stage.NONE)
    return TerminationReport(stage=stage, outcome=outcome, retry_in=retry_in,
                             message=message).render()


# -- the cluster stopped the run --------------------------------------------------------


def test_oom_killed_names_the_memory_limit_and_is_not_retried() -> None:
    verdict = classify(job=job(memory="200Mi"), pods=[pod(code=137, reason="OOMKilled")],
                       log_tail="allocating\n")
    assert verdict == Verdict(False, "OOMKilled",
                              "Reduction ran out of memory (limit 200Mi) and was killed",
                              transient=False)


def test_oom_without_a_memory_limit_says_so() -> None:
    bare = job()
    bare["spec"]["template"]["spec"]["containers"] = [{"name": "runner"}]
    verdict = classify(job=bare, pods=[pod(code=137, reason="OOMKilled")], log_tail="")
    assert verdict.message == "Reduction ran out of memory (limit ?) and was killed"


def test_deadline_from_the_job_condition_wins_over_what_the_runner_said() -> None:
    # The deadline's SIGTERM makes the runner exit 4 with posted=false: the reason is
    # the deadline, not an infrastructure failure worth retrying.
    stopped = pod(code=int(ExitCode.NOT_POSTED),
                  message=said(outcome=Outcome.ERROR, posted=False, message=SIGTERM_NOTE))
    verdict = classify(job=job(failed="DeadlineExceeded", deadline=4, job_deadline=True),
                       pods=[stopped], log_tail="tick\n")
    assert verdict == Verdict(False, "DeadlineExceeded",
                              "Reduction exceeded its time limit of 4 s and was stopped",
                              transient=False)


def test_deadline_from_the_pod_status() -> None:
    verdict = classify(job=job(deadline=60), pods=[pod(phase_reason="DeadlineExceeded")],
                       log_tail="")
    assert (verdict.reason, verdict.transient) == ("DeadlineExceeded", False)
    assert "time limit of 60 s" in verdict.message


def test_the_pods_deadline_wins_over_what_the_runner_said() -> None:
    # Our Jobs' limit is the pod's: the kubelet ends the pod (status.reason), the Job
    # then fails for its backoff limit, and the runner's SIGTERM note is not the reason.
    stopped = pod(code=int(ExitCode.NOT_POSTED), phase_reason="DeadlineExceeded",
                  message=said(outcome=Outcome.ERROR, posted=False, message=SIGTERM_NOTE))
    verdict = classify(job=job(failed="BackoffLimitExceeded", deadline=4), pods=[stopped],
                       log_tail="tick\n")
    assert verdict == Verdict(False, "DeadlineExceeded",
                              "Reduction exceeded its time limit of 4 s and was stopped",
                              transient=False)


def test_eviction_is_transient_and_quotes_the_kubelet() -> None:
    # The runner saw SIGTERM too; the pod's Evicted reason is what counts.
    evicted = pod(code=int(ExitCode.NOT_POSTED), phase_reason="Evicted", phase_message=EVICTED,
                  message=said(outcome=Outcome.ERROR, posted=False, message=SIGTERM_NOTE))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[evicted], log_tail="")
    assert verdict == Verdict(
        False, "Evicted", "Reduction pod was evicted: The node was low on resource: memory.",
        transient=True)


def disrupted(reason: str, message: str) -> Obj:
    """A runner pod the cluster stopped: SIGTERM, exit 4 with "not posted", and the
    DisruptionTarget condition the scheduler, the Eviction API or the kubelet set."""
    stopped = pod(code=int(ExitCode.NOT_POSTED),
                  message=said(outcome=Outcome.COMPLETE, posted=False, message=SIGTERM_NOTE))
    stopped["status"]["conditions"] = [
        {"type": "Ready", "status": "False"},
        {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}]
    return stopped


@pytest.mark.parametrize(("reason", "message", "expected_reason", "expected_text"), [
    ("PreemptionByScheduler", "node-2: preempting to accommodate a higher priority pod",
     "Preempted", "Reduction pod was preempted by the scheduler for a run of higher "
     "priority: node-2: preempting to accommodate a higher priority pod"),
    ("EvictionByEvictionAPI", "Eviction API: evicting", "Evicted",
     "Reduction pod was evicted through the Eviction API (a node drain or the cluster "
     "autoscaler removing its node): Eviction API: evicting"),
    ("DeletionByTaintManager", "", "NodeTainted", "Reduction pod was deleted because its "
     "node was tainted NoExecute (the node is unreachable or being removed)"),
    ("SomethingNew", "why", "Disrupted", "Reduction pod was stopped by the cluster: why"),
])  # fmt: skip
def test_a_disrupted_pod_is_retried_at_once_and_says_who_stopped_it(
    reason: str, message: str, expected_reason: str, expected_text: str
) -> None:
    # The runner decided Complete but was stopped before posting: the run is retried,
    # not reported as the "exit code 4" of a broker fault.
    verdict = classify(job=job(failed="BackoffLimitExceeded"),
                       pods=[disrupted(reason, message)], log_tail="")
    assert verdict == Verdict(False, expected_reason, expected_text, transient=True,
                              retry_in=0)


def test_a_disruption_condition_that_is_not_true_is_not_a_disruption() -> None:
    stopped = disrupted("PreemptionByScheduler", "x")
    stopped["status"]["conditions"][1]["status"] = "False"
    verdict = classify(job=job(), pods=[stopped], log_tail="")
    assert verdict.reason == "InfrastructureError"


def test_eviction_without_a_message() -> None:
    verdict = classify(job=job(), pods=[pod(phase_reason="Evicted")], log_tail="")
    assert verdict.message == "Reduction pod was evicted:"


@pytest.mark.parametrize(("reason", "text", "expected"), [
    ("ImagePullBackOff", 'Back-off pulling image "registry.invalid/x:1"',
     'ImagePullBackOff: Back-off pulling image "registry.invalid/x:1"'),
    ("ErrImagePull", "no such image", "ErrImagePull: no such image"),
    ("ErrImageNeverPull", 'Container image "x:1" is not present with pull policy of Never',
     'ErrImageNeverPull: Container image "x:1" is not present with pull policy of Never'),
    ("InvalidImageName", "", "InvalidImageName"),
    ("CreateContainerConfigError", 'secret "broker" not found',
     'CreateContainerConfigError: secret "broker" not found'),
    ("CreateContainerError", "mount failed", "CreateContainerError: mount failed"),
])  # fmt: skip
def test_image_pull_and_container_errors_are_stuck(reason: str, text: str,
                                                   expected: str) -> None:
    assert stuck_reason(pod(waiting=(reason, text))) == expected


def test_a_stuck_poster_sidecar_is_stuck_too() -> None:
    """The sidecar starts first: an image it cannot pull leaves the runner only
    PodInitializing."""
    stuck = pod(waiting=("PodInitializing", ""))
    stuck["status"]["initContainerStatuses"] = [
        {"name": "poster", "state": {"waiting": {"reason": "ErrImagePull", "message": "nope"}}}]
    assert stuck_reason(stuck) == "ErrImagePull: nope"


@pytest.mark.parametrize("reason", ["ContainerCreating", "PodInitializing", "CrashLoopBackOff"])
def test_waiting_that_fixes_itself_is_not_stuck(reason: str) -> None:
    assert stuck_reason(pod(waiting=(reason, "back-off 10s"))) is None


def test_running_or_statusless_pods_are_not_stuck() -> None:
    assert stuck_reason(pod()) is None
    assert stuck_reason({"metadata": {"name": "p"}}) is None


# -- the runner's exit codes (runner-image/README.md) -----------------------------------


def test_exit_0_posted_by_the_runner() -> None:
    ended = pod(code=int(ExitCode.POSTED_OK), reason="Completed",
                message=said(outcome=Outcome.COMPLETE, posted=True, message="output in /o"))
    verdict = classify(job=job(), pods=[ended], log_tail="")
    assert verdict == Verdict(True, "Complete", "output in /o", transient=False)


def test_exit_1_error_posted_by_the_runner_is_left_alone() -> None:
    ended = pod(code=int(ExitCode.POSTED_ERROR),
                message=said(outcome=Outcome.ERROR, posted=True, message="ZeroDivisionError"))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[ended],
                       log_tail="Traceback\n")
    assert verdict == Verdict(True, "Error", "ZeroDivisionError", transient=False)


def test_exit_2_bad_configuration_is_reported_on_its_behalf_and_not_retried() -> None:
    ended = pod(code=int(ExitCode.BAD_CONFIG),
                message=said(outcome=None, posted=False,
                             message="bad runner configuration: no message file"))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[ended],
                       log_tail="ERROR bad runner configuration: no message file\n")
    assert (verdict.posted_by_runner, verdict.reason, verdict.transient) == (
        False, "ExitCode2", False)
    assert verdict.message == (
        "Reduction process exited with code 2 without reporting an outcome; "
        "last lines of its log:\nERROR bad runner configuration: no message file")


def test_exit_3_posted_with_retry_in_is_transient_with_the_runners_delay() -> None:
    ended = pod(code=int(ExitCode.POSTED_RETRY),
                message=said(outcome=Outcome.ERROR, posted=True, retry_in=21600,
                             message="Permission problem"))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[ended], log_tail="")
    assert verdict == Verdict(True, "Error", "Permission problem", transient=True,
                              retry_in=21600)


def test_exit_4_not_posted_is_an_infrastructure_error_worth_retrying() -> None:
    ended = pod(code=int(ExitCode.NOT_POSTED),
                message=said(outcome=Outcome.COMPLETE, posted=False,
                             message="outcome not posted (broker): no receipt"))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[ended],
                       log_tail="reduced\nconnection lost\n")
    assert (verdict.posted_by_runner, verdict.reason, verdict.transient) == (
        False, "InfrastructureError", True)
    assert verdict.retry_in is None  # the retry policy's delay applies
    assert verdict.message == (
        "The runner's Complete was not posted (outcome not posted (broker): no receipt). "
        "Reduction process exited with code 4 without reporting an outcome "
        "(it could not reach the message broker, or was stopped); "
        "last lines of its log:\nreduced\nconnection lost")


def test_sigterm_from_a_cancel_or_drain_is_not_posted_and_transient() -> None:
    # The runner leaves the outcome to the dispatcher; a cancellation claims the Job's
    # outcome before deleting it, so this verdict is only used for other SIGTERMs.
    ended = pod(code=int(ExitCode.NOT_POSTED),
                message=said(outcome=Outcome.ERROR, posted=False, message=SIGTERM_NOTE))
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[ended], log_tail="")
    assert (verdict.posted_by_runner, verdict.reason, verdict.transient) == (
        False, "InfrastructureError", True)
    assert "or was stopped" in verdict.message
    assert "last lines" not in verdict.message  # no log, no empty heading


@pytest.mark.parametrize("code", [int(c) for c in ExitCode])
def test_without_a_termination_message_only_the_exit_code_is_known(code: int) -> None:
    # The termination log may be unwritable: nothing says the runner posted, so the
    # dispatcher reports (a possible duplicate beats a run with no outcome).
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[pod(code=code)],
                       log_tail="last words\n")
    assert not verdict.posted_by_runner
    assert verdict.reason == ("InfrastructureError" if code == 4 else f"ExitCode{code}")
    assert verdict.transient is (code == 4)
    assert verdict.message.startswith(f"Reduction process exited with code {code} ")
    assert verdict.message.endswith("last lines of its log:\nlast words")


def test_crash_with_an_unknown_exit_code_quotes_the_log_tail() -> None:
    # Killed by a signal (SIGKILL: 137) before writing a termination message.
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[pod(code=137)],
                       log_tail="  step 1\ntaking the runner down with me\n\n")
    assert verdict == Verdict(
        False, "ExitCode137",
        "Reduction process exited with code 137 without reporting an outcome; "
        "last lines of its log:\nstep 1\ntaking the runner down with me",
        transient=False)


def test_blank_log_tail_adds_nothing() -> None:
    verdict = classify(job=job(), pods=[pod(code=139)], log_tail=" \n\n")
    assert verdict.message == "Reduction process exited with code 139 without reporting an outcome"


# -- no pod to read ---------------------------------------------------------------------


def test_failed_job_without_pods_reports_the_job_condition_as_transient() -> None:
    verdict = classify(job=job(failed="BackoffLimitExceeded"), pods=[], log_tail="")
    assert verdict == Verdict(
        False, "BackoffLimitExceeded",
        "Reduction failed: BackoffLimitExceeded: Job failed: BackoffLimitExceeded",
        transient=True)


def test_nothing_known_at_all() -> None:
    verdict = classify(job=job(), pods=[pod()], log_tail="")
    assert verdict == Verdict(
        False, "Unknown", "Reduction failed: Unknown: the Job failed without a pod status",
        transient=True)


def test_a_pod_still_running_is_skipped_for_one_that_ended() -> None:
    ended = pod(code=137, reason="OOMKilled")
    assert classify(job=job(), pods=[pod(), ended], log_tail="").reason == "OOMKilled"


# -- the termination message ------------------------------------------------------------


def test_runner_report_reads_what_the_runner_wrote() -> None:
    report = runner_report(pod(code=3, message=said(outcome=Outcome.ERROR, posted=True,
                                                    retry_in=4, message="Permission problem")))
    assert report is not None
    assert (report.outcome, report.posted, report.retry_in, report.message) == (
        "Error", True, 4, "Permission problem")


@pytest.mark.parametrize("text", [
    "",  # nothing written
    "Traceback (most recent call last):\n  ...",  # FallbackToLogsOnError
    '["posted"]',  # JSON, but not an object
    '{"outcome": "Complete"}',  # an object without "posted"
])  # fmt: skip
def test_runner_report_ignores_anything_else(text: str) -> None:
    assert runner_report(pod(code=1, message=text)) is None


def test_runner_report_ignores_a_retry_in_that_is_not_a_number() -> None:
    report = runner_report(pod(code=3, message='{"posted": true, "retry_in": "4"}'))
    assert report is not None and report.retry_in is None


def test_an_error_posted_on_behalf_never_echoes_a_stale_retry_in() -> None:
    raw = {"run_number": 5, "retry_in": 21600}
    assert error_body(raw, message="OOMKilled")["retry_in"] is None
    assert error_body(raw, message="evicted", retry_in=30)["retry_in"] == 30


# -- the runner was stopped while sending ----------------------------------------------


def test_a_runner_stopped_while_sending_gets_that_same_outcome_resent() -> None:
    # Killed after "sending" was recorded and before "posted": the broker may hold the
    # Complete, so the dispatcher may only send the same Complete, never an Error.
    sending = TerminationReport(stage=Stage.SENDING, outcome=Outcome.COMPLETE,
                                reduction_data=["/instrument/WISH/RB1/autoreduced/7"]).render()
    verdict = classify(job=job(failed="BackoffLimitExceeded"),
                       pods=[pod(code=137, message=sending)], log_tail="")
    assert verdict == Verdict(False, "UnconfirmedComplete", "", transient=False,
                              outcome=Outcome.COMPLETE,
                              reduction_data=["/instrument/WISH/RB1/autoreduced/7"],
                              possible_repeat=True)


def test_sending_wins_over_the_deadline_and_oom() -> None:
    sending = TerminationReport(stage=Stage.SENDING, outcome=Outcome.ERROR, retry_in=60,
                                message="Error in user reduction script: X - y").render()
    for ended in (pod(code=137, reason="OOMKilled", message=sending),
                  pod(code=137, message=sending)):
        verdict = classify(job=job(failed="DeadlineExceeded"), pods=[ended], log_tail="")
        assert (verdict.outcome, verdict.message, verdict.retry_in, verdict.possible_repeat) == (
            Outcome.ERROR, "Error in user reduction script: X - y", 60, True)


def test_a_report_of_the_first_version_still_reads() -> None:
    old = '{"outcome": "Complete", "posted": false, "retry_in": null, "message": "x"}'
    report = runner_report(pod(code=4, message=old))
    assert report is not None
    assert (report.stage, report.outcome, report.maybe_sent) == (
        Stage.DECIDED, Outcome.COMPLETE, False)


def test_a_report_never_exceeds_what_kubernetes_keeps() -> None:
    huge = TerminationReport(stage=Stage.SENDING, outcome=Outcome.COMPLETE,
                             message="\u00e9" * 10_000,
                             reduction_data=["/instrument/" + "d" * 400] * 50).render()
    assert len(huge.encode()) <= 4096
    report = runner_report(pod(code=137, message=huge))
    assert report is not None and report.stage is Stage.SENDING and report.reduction_data


def test_a_recorded_verdict_round_trips() -> None:
    verdict = Verdict(False, "UnconfirmedSkipped", "skip", transient=False,
                      outcome=Outcome.SKIPPED, reduction_data=["/a"], possible_repeat=True)
    assert parse_verdict(render_verdict(verdict)) == verdict
    assert parse_verdict(None) is None and parse_verdict("{") is None

"""Why a run ended, read from its Job and Pod status (pure).

The runner reports its own outcome and says so in its termination message. When
it could not (the pod was OOM-killed, hit its deadline, was evicted, never pulled
its image, or the runner crashed), the dispatcher posts ReductionError on its
behalf with the reason worked out here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import (
    OOM_KILLED,
    UNKNOWN_LIMIT,
    ExitCode,
    TerminationReport,
    out_of_memory_message,
    parse_report,
    quantity_bytes,
    render_memory,
)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    """What happened to a finished run, from the cluster's point of view."""

    posted_by_runner: bool
    reason: str  # short machine-friendly reason, e.g. OOMKilled, DeadlineExceeded
    message: str  # human text for the outcome's ``message`` field
    transient: bool  # worth retrying automatically
    retry_in: int | None = None
    # The outcome to post on the run's behalf: Error, unless the runner had begun to
    # send another one (then exactly that one, with what it recorded).
    outcome: Outcome = Outcome.ERROR
    reduction_data: list[str] = field(default_factory=list)
    # The runner may already have delivered this very outcome: a copy may repeat it.
    possible_repeat: bool = False
    # A run retried bigger after running out of memory (``oom_retry``): the retry
    # message's memory headers.
    memory: dict[str, str] = field(default_factory=dict)


def runner_report(pod: Obj) -> TerminationReport | None:
    """The runner container's termination report, when it wrote one."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        report = parse_report(terminated.get("message") or "")
        if report is not None:
            return report
    return None


def _resend(report: TerminationReport) -> Verdict:
    """The runner began to send this outcome and was stopped before the receipt: the
    broker may hold it, so only the same outcome may follow (never a contradiction)."""
    assert report.outcome is not None
    return Verdict(
        False,
        f"Unconfirmed{report.outcome.value}",
        report.message,
        transient=False,
        retry_in=report.retry_in,
        outcome=report.outcome,
        reduction_data=list(report.reduction_data),
        possible_repeat=True,
    )


def cancelled(*, pods: list[Obj], note: str) -> Verdict:
    """The verdict for a running run that was cancelled, once its pods have stopped."""
    reports = [r for r in (runner_report(p) for p in pods) if r is not None]
    posted = next((r for r in reports if r.posted), None)
    if posted is not None:
        return Verdict(True, "Posted", posted.message, transient=False)
    sending = next((r for r in reports if r.maybe_sent and r.outcome is not None), None)
    if sending is not None:
        return _resend(sending)
    return Verdict(False, "Cancelled", note, transient=False)


def _job_condition(job: Obj) -> Obj:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") in {"Failed", "FailureTarget"}
            and condition.get("status") == "True"
        ):
            return dict(condition)
    return {}


def _terminated(pod: Obj) -> Obj:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
    return {}


def _memory_limit(job: Obj) -> str:
    """The runner's memory limit as the runner itself would render it from its cgroup."""
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers"
    ) or [{}]
    limit = ((containers[0].get("resources") or {}).get("limits") or {}).get("memory")
    if limit is None:
        return UNKNOWN_LIMIT
    count = quantity_bytes(str(limit))
    return render_memory(count) if count else str(limit)


def classify(*, job: Obj, pods: list[Obj], log_tail: str) -> Verdict:
    """The verdict for a Job that finished as Failed."""
    reports = [r for r in (runner_report(p) for p in pods) if r is not None]
    posted = [r for r in reports if r.posted]
    if posted:
        return Verdict(
            True,
            posted[0].reason or (posted[0].outcome.value if posted[0].outcome else "Error"),
            posted[0].message,
            transient=posted[0].retry_in is not None,
            retry_in=posted[0].retry_in,
        )
    sending = [r for r in reports if r.maybe_sent and r.outcome is not None]
    if sending:
        return _resend(sending[0])
    condition = _job_condition(job)
    if condition.get("reason") == "DeadlineExceeded":
        return _deadline(job)
    for pod in pods:
        verdict = _pod_verdict(job=job, pod=pod, log_tail=log_tail)
        if verdict is not None:
            return _with_unposted(verdict, reports)
    if reports:
        return Verdict(
            False, "NotPosted", reports[0].message or "runner reported no outcome", transient=True
        )
    reason = condition.get("reason") or "Unknown"
    message = condition.get("message") or "the Job failed without a pod status"
    return Verdict(False, reason, f"Reduction failed: {reason}: {message}", transient=True)


def _with_unposted(verdict: Verdict, reports: list[TerminationReport]) -> Verdict:
    """Add what the runner had decided but could not post (exit 4: broker away).

    Without it a run that reduced fine reads as a bare "exited with code 4"; with it
    the web app's error text says the output is there and only the message is missing.
    """
    decided = next((r for r in reports if r.outcome is not None), None)
    unreported = verdict.reason.startswith(("InfrastructureError", "ExitCode"))
    if decided is None or decided.outcome is None or not unreported:
        return verdict
    detail = decided.message.strip() or (
        "output in " + ", ".join(decided.reduction_data) if decided.reduction_data else "")
    said = f" ({detail})" if detail else ""
    text = f"The runner's {decided.outcome.value} was not posted{said}. {verdict.message}"
    return Verdict(False, verdict.reason, text, transient=verdict.transient,
                   retry_in=verdict.retry_in)


def _deadline(job: Obj) -> Verdict:
    """The time limit was reached: the pod's own (``spec.template.spec``, where our
    Jobs set it), or the Job's (Jobs made by an earlier version, or a site template)."""
    spec = job.get("spec") or {}
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    deadline = pod_spec.get("activeDeadlineSeconds") or spec.get("activeDeadlineSeconds")
    return Verdict(
        False,
        "DeadlineExceeded",
        f"Reduction exceeded its time limit of {deadline} s and was stopped",
        transient=False,
    )


# The pod's DisruptionTarget reasons (Kubernetes 1.26+): who stopped it, in words for
# the outcome. Each is the cluster's doing, not the run's: retried (as transient) at
# once, since waiting would not help, and the new version asks the scheduler again.
DISRUPTIONS = {
    "PreemptionByScheduler": ("Preempted", "preempted by the scheduler for a run of "
                              "higher priority"),
    "EvictionByEvictionAPI": ("Evicted", "evicted through the Eviction API (a node drain "
                              "or the cluster autoscaler removing its node)"),
    "DeletionByTaintManager": ("NodeTainted", "deleted because its node was tainted "
                               "NoExecute (the node is unreachable or being removed)"),
    "DeletionByPodGC": ("NodeGone", "deleted because its node no longer exists"),
    "TerminationByKubelet": ("NodeShutdown", "stopped by its node's kubelet (a node "
                             "shutdown)"),
}


def disruption(pod: Obj) -> Verdict | None:
    """The cluster stopped the pod (preemption, a drain, a lost node): say which."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") != "DisruptionTarget" or condition.get("status") != "True":
            continue
        reason, said = DISRUPTIONS.get(str(condition.get("reason") or ""),
                                       ("Disrupted", "stopped by the cluster"))
        detail = str(condition.get("message") or "").strip()
        text = f"Reduction pod was {said}" + (f": {detail}" if detail else "")
        return Verdict(False, reason, text, transient=True, retry_in=0)
    return None


def _pod_verdict(*, job: Obj, pod: Obj, log_tail: str) -> Verdict | None:
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        # The kubelet's own eviction (node pressure, often this pod's own use): its
        # message says which resource; retried after the usual delay, not at once.
        return Verdict(
            False,
            "Evicted",
            f"Reduction pod was evicted: {status.get('message', '')}".strip(),
            transient=True,
        )
    disrupted = disruption(pod)
    if disrupted is not None:
        return disrupted
    if status.get("reason") == "DeadlineExceeded":
        return _deadline(job)
    terminated = _terminated(pod)
    if terminated.get("reason") == OOM_KILLED:
        return Verdict(
            False,
            OOM_KILLED,
            out_of_memory_message(limit=_memory_limit(job)),
            transient=False,
        )
    if not terminated:
        return None
    code = terminated.get("exitCode")
    infra = code == ExitCode.NOT_POSTED
    text = f"Reduction process exited with code {code} without reporting an outcome"
    if infra:
        text += " (it could not reach the message broker, or was stopped)"
    if log_tail.strip():
        text += "; last lines of its log:\n" + log_tail.strip()
    return Verdict(
        False, "InfrastructureError" if infra else f"ExitCode{code}", text, transient=infra
    )


# Pod waiting reasons that mean the image will not start without someone acting.
STUCK_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    # imagePullPolicy Never on a node without the image (air-gapped sites preload
    # images): the kubelet will never pull it, so the pod waits for ever.
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


def stuck_reason(pod: Obj) -> str | None:
    """A waiting reason that will not fix itself (image pull failures and the like).
    The poster sidecar starts first, so a bad image shows on it, not on the runner."""
    status_of = pod.get("status") or {}
    for status in [*(status_of.get("initContainerStatuses") or []),
                   *(status_of.get("containerStatuses") or [])]:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    return None


def render_verdict(verdict: Verdict) -> str:
    """The verdict as the Job annotation that records it before it is posted."""
    data = dataclasses.asdict(verdict)
    data["outcome"] = verdict.outcome.value
    return json.dumps(data, ensure_ascii=False)


def parse_verdict(text: str | None) -> Verdict | None:
    """A recorded verdict, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(text or "")
        data["outcome"] = Outcome(data["outcome"])
        return Verdict(**data)
    except (ValueError, TypeError, KeyError):
        return None

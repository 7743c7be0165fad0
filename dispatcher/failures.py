"""Why a run ended, read from its Job and Pod status (pure).

The runner reports its own outcome and says so in its termination message. When
it could not (the pod was OOM-killed, hit its deadline, was evicted, never pulled
its image, or the runner crashed), the dispatcher posts ReductionError on its
behalf with the reason worked out here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# Runner exit codes (runner-image/README.md).
EXIT_INFRASTRUCTURE = 4


@dataclass(frozen=True)
class RunnerReport:
    """The runner's termination message: what it posted, if anything."""

    outcome: str
    posted: bool
    retry_in: int | None
    message: str


@dataclass(frozen=True)
class Verdict:
    """What happened to a finished run, from the cluster's point of view."""

    posted_by_runner: bool
    reason: str  # short machine-friendly reason, e.g. OOMKilled, DeadlineExceeded
    message: str  # human text for ReductionError.message
    transient: bool  # worth retrying automatically
    retry_in: int | None = None


def runner_report(pod: Obj) -> RunnerReport | None:
    """Parse the runner container's termination message, when it wrote one."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        text = terminated.get("message") or ""
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and "posted" in data:
            retry = data.get("retry_in")
            return RunnerReport(
                outcome=str(data.get("outcome", "")),
                posted=bool(data.get("posted")),
                retry_in=int(retry) if isinstance(retry, int) else None,
                message=str(data.get("message", "")),
            )
    return None


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
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers"
    ) or [{}]
    return str(((containers[0].get("resources") or {}).get("limits") or {}).get("memory", "?"))


def classify(*, job: Obj, pods: list[Obj], log_tail: str) -> Verdict:
    """The verdict for a Job that finished as Failed."""
    reports = [r for r in (runner_report(p) for p in pods) if r is not None]
    posted = [r for r in reports if r.posted]
    if posted:
        return Verdict(
            True,
            posted[0].outcome or "Error",
            posted[0].message,
            transient=posted[0].retry_in is not None,
            retry_in=posted[0].retry_in,
        )
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


def _with_unposted(verdict: Verdict, reports: list[RunnerReport]) -> Verdict:
    """Add what the runner had decided but could not post (exit 4: broker away).

    Without it a run that reduced fine reads as a bare "exited with code 4"; with it
    the web app's error text says the output is there and only the message is missing.
    """
    decided = next((r for r in reports if r.outcome and r.outcome.lower() != "none"), None)
    if decided is None or not verdict.reason.startswith(("InfrastructureError", "ExitCode")):
        return verdict
    said = f" ({decided.message.strip()})" if decided.message.strip() else ""
    text = f"The runner's {decided.outcome} was not posted{said}. {verdict.message}"
    return Verdict(False, verdict.reason, text, transient=verdict.transient,
                   retry_in=verdict.retry_in)


def _deadline(job: Obj) -> Verdict:
    deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
    return Verdict(
        False,
        "DeadlineExceeded",
        f"Reduction exceeded its time limit of {deadline} s and was stopped",
        transient=False,
    )


def _pod_verdict(*, job: Obj, pod: Obj, log_tail: str) -> Verdict | None:
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return Verdict(
            False,
            "Evicted",
            f"Reduction pod was evicted: {status.get('message', '')}".strip(),
            transient=True,
        )
    if status.get("reason") == "DeadlineExceeded":
        return _deadline(job)
    terminated = _terminated(pod)
    if terminated.get("reason") == "OOMKilled":
        return Verdict(
            False,
            "OOMKilled",
            f"Reduction ran out of memory (limit {_memory_limit(job)}) and was killed",
            transient=False,
        )
    if not terminated:
        return None
    code = terminated.get("exitCode")
    infra = code == EXIT_INFRASTRUCTURE
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
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


def stuck_reason(pod: Obj) -> str | None:
    """A waiting reason that will not fix itself (image pull failures and the like)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    return None

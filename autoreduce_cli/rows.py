"""One Job as the operator sees it: its run, its state and why it is there (pure).

Inputs are the plain dicts the API returns (the Job, its Pods, who holds each RB)
and "now"; nothing here does I/O, so every row can be tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from autoreduce_common.pod_contract import TerminationReport

from dispatcher import admission, failures
from dispatcher.identity import Labels
from dispatcher.outcome_state import OUTCOME_KEY, VERDICT_KEY, OutcomeState

Obj = Mapping[str, Any]

WAITING = "waiting"
RUNNING = "running"
FINISHED = "finished"


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch of an API timestamp; None when absent or malformed."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class RunRow:
    """One run as the operator sees it."""

    job: str
    instrument: str
    rb: str
    run: str
    version: str
    state: str  # waiting | running | finished
    outcome: str  # finished runs: Complete, Error, Skipped, Cancelled, Failed
    age_s: float | None  # since the Job was created (the run arrived)
    in_state_s: float | None  # waiting: since arrival; running: since start; finished: since end
    detail: str  # why it waits, where it runs, or how it ended
    priority: int = 4
    enqueued_ms: int = 0


def labels_of(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _annotations_of(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _finish(job: Obj, labels: Labels, pods: Sequence[Obj]) -> tuple[str, str]:
    """(outcome, detail) of a finished Job."""
    claimed = _annotations_of(job).get(labels.key(OUTCOME_KEY), "")
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    reports = [r for r in (failures.runner_report(dict(pod)) for pod in pods)
               if r is not None and r.outcome is not None]
    # Only what the runner posted is the run's outcome: a runner stopped after deciding
    # (preempted, evicted, cancelled) decided nothing the web app ever saw.
    for report in (r for r in reports if r.posted):
        return _reported(report)
    if claimed == OutcomeState.CANCELLED:
        return "Cancelled", "cancelled by a cancel message"
    # The outcome the dispatcher posted on the runner's behalf says more than the Job's
    # condition: "ran out of memory", not "BackoffLimitExceeded".
    verdict = failures.parse_verdict(_annotations_of(job).get(labels.key(VERDICT_KEY)))
    if verdict is not None:
        return verdict.outcome.value, verdict.message[:200]
    for report in (r for r in reports if r.maybe_sent):  # the dispatcher will send it again
        return _reported(report)
    if admission.succeeded(dict(job)):
        return "Complete", ""
    failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
    detail = f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": ")
    return "Failed", detail[:200]


def _reported(report: TerminationReport) -> tuple[str, str]:
    assert report.outcome is not None
    detail = report.message or (
        "output in " + ", ".join(report.reduction_data) if report.reduction_data else "")
    return report.outcome.value, detail[:200]


# The cluster autoscaler's verdicts on a pending pod (its Events' reasons).
AUTOSCALER_REASONS = ("TriggeredScaleUp", "NotTriggerScaleUp")


def autoscaler_notes(events: Sequence[Obj]) -> dict[str, str]:
    """Pod name -> the cluster autoscaler's latest word on it ("TriggeredScaleUp: pod
    triggered scale-up: [{pool 1->2 (max: 5)}]"), from its Events of those reasons."""
    latest: dict[str, tuple[float, str]] = {}
    for event in events:
        if event.get("reason") not in AUTOSCALER_REASONS:
            continue
        pod = str((event.get("regarding") or {}).get("name", ""))
        series = event.get("series") or {}
        at = parse_time(series.get("lastObservedTime") or event.get("eventTime")
                        or event.get("deprecatedLastTimestamp")) or 0.0
        note = f"{event['reason']}: {str(event.get('note') or '').strip()}".strip(": ")
        if pod and at >= latest.get(pod, (-1.0, ""))[0]:
            latest[pod] = (at, note)
    return {pod: note for pod, (_, note) in latest.items()}


def _pod_state(pod: Obj, autoscaler: Mapping[str, str]) -> str:
    """A pod's phase, and why a pending one is not running yet: the scheduler's own
    message ("0/2 nodes are available: 2 Insufficient memory."), which is also what the
    cluster autoscaler acts on, and the autoscaler's answer when it gave one, or a
    container's waiting reason (an image pull)."""
    status = pod.get("status") or {}
    name = str((pod.get("metadata") or {}).get("name", "?"))
    text = f"{name} {status.get('phase', '?')}"
    if status.get("phase") != "Pending":
        return text
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
            if name in autoscaler:
                why = f"{why}; cluster-autoscaler: {autoscaler[name]}".strip("; ")
            return f"{text} ({why})" if why else text
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return f"{text} ({waiting['reason']})"
    return text


def _state(job: Obj) -> str:
    if admission.is_finished(dict(job)):
        return FINISHED
    if admission.is_suspended(dict(job)):
        return WAITING
    return RUNNING
def row_for(
    job: Obj, *, labels: Labels, pods: Sequence[Obj], holders: Mapping[str, str], now: float,
    autoscaler: Mapping[str, str] | None = None,
) -> RunRow:
    """One Job as a row (``pods``: this Job's pods; ``holders``: RB -> holding Job;
    ``autoscaler``: pod -> the cluster autoscaler's word on it)."""
    meta = job.get("metadata") or {}
    tags = labels_of(job)
    notes = _annotations_of(job)
    name = str(meta.get("name", ""))
    rb = str(tags.get(labels.key("rb-number"), ""))
    created = parse_time(meta.get("creationTimestamp"))
    state = _state(job)
    outcome, detail, since = "", "", created
    if state == WAITING:
        holder = holders.get(rb)
        if holder and holder != name:
            detail = f"RB held by {holder}"
        elif meta.get("deletionTimestamp"):
            detail = "being cancelled"
        else:
            detail = "waiting for a slot (caps) or for admission"
    elif state == RUNNING:
        since = parse_time((job.get("status") or {}).get("startTime")) or created
        running_pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        detail = ", ".join(_pod_state(p, autoscaler or {}) for p in running_pods) or "starting"
    else:
        status = job.get("status") or {}
        since = parse_time(status.get("completionTime")) or _last_transition(job) or created
        outcome, detail = _finish(job, labels, pods)

    def number(key: str, default: int) -> int:
        try:
            return int(notes.get(labels.key(key), default))
        except (TypeError, ValueError):
            return default

    return RunRow(
        job=name,
        instrument=str(tags.get(labels.key("instrument"), "")),
        rb=rb,
        run=str(notes.get(labels.key("runs")) or tags.get(labels.key("run-number"), "")),
        version=str(tags.get(labels.key("run-version"), "")),
        state=state,
        outcome=outcome,
        age_s=None if created is None else now - created,
        in_state_s=None if since is None else now - since,
        detail=detail,
        priority=number("priority", 4),
        enqueued_ms=number("enqueued-at", 0),
    )


def _last_transition(job: Obj) -> float | None:
    times = [
        parse_time(c.get("lastTransitionTime"))
        for c in (job.get("status") or {}).get("conditions") or []
    ]
    known = [t for t in times if t is not None]
    return max(known) if known else None

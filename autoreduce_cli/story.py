"""``autoreduce explain``: one run's whole story in time order (pure).

"Why is my run not running?" has many answers, each recorded somewhere else: the
broker's enqueue time and the priority (the Job's annotations), the RB holder and the
caps (the dispatcher's Events), the scheduler's verdict and the cluster autoscaler's
(the pod's Events and its ``PodScheduled`` condition), the kubelet's image pulls and
container states, who stopped a pod (``DisruptionTarget``), and who posted the outcome
(the runner's termination report, or the dispatcher's verdict and Event). This module
puts every version's records on one time line; the inputs are the plain dicts the
API returns, so every line is testable with plain values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from autoreduce_common.pod_contract import parse_report

from autoreduce_cli.rows import FINISHED, RunRow, labels_of, parse_time, row_for
from dispatcher import failures
from dispatcher.identity import Labels
from dispatcher.outcome_state import VERDICT_KEY

Obj = Mapping[str, Any]
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass(frozen=True)
class Entry:
    """One thing that happened to a run, by whom, about which object."""

    at: float | None  # seconds since the epoch; None when the record has no time
    source: str  # broker, dispatcher, job-controller, default-scheduler, kubelet, runner...
    about: str  # the Job or Pod name
    text: str
    # Where it comes in a run's life: most API times are whole seconds, so within one
    # second this orders the records (enqueued, created, admitted, started, pod...).
    stage: int = 0


# Stages of a run's life (Entry.stage), in order.
ENQUEUED, CREATED, WAITED, ADMITTED, STARTED, POD, SCHEDULING, NODE, STOPPING, RUNNER, \
    ENDED, POSTED = range(12)


@dataclass(frozen=True)
class Story:
    versions: list[RunRow]
    entries: list[Entry]


def _meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _name(obj: Obj) -> str:
    return str(_meta(obj).get("name", ""))


def _job_entries(job: Obj, labels: Labels) -> list[Entry]:
    name, notes = _name(job), _meta(job).get("annotations") or {}
    entries: list[Entry] = []
    try:
        enqueued: float | None = int(notes.get(labels.key("enqueued-at"), "")) / 1000
    except ValueError:
        enqueued = None
    priority = notes.get(labels.key("priority"), "?")
    if enqueued:
        entries.append(Entry(enqueued, "broker", name,
                             f"message enqueued on the pending queue (priority {priority})",
                             ENQUEUED))
    entries.append(Entry(parse_time(_meta(job).get("creationTimestamp")), "dispatcher", name,
                         "run accepted: Job created (suspended until admitted)", CREATED))
    status = job.get("status") or {}
    if status.get("startTime"):
        entries.append(Entry(parse_time(status["startTime"]), "job-controller", name,
                             "Job started: admitted, its pod may be created", STARTED))
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            why = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
            entries.append(Entry(parse_time(condition.get("lastTransitionTime")),
                                 "job-controller", name,
                                 f"Job {condition['type']}" + (f" ({why})" if why else ""),
                                 ENDED))
    verdict = failures.parse_verdict(notes.get(labels.key(VERDICT_KEY)))
    if verdict is not None and not verdict.posted_by_runner:
        entries.append(Entry(None, "dispatcher", name,
                             f"verdict recorded: Reduction{verdict.outcome.value} on the run's "
                             f"behalf ({verdict.reason}): {verdict.message}", POSTED))
    return entries


def _containers(pod: Obj) -> list[tuple[str, Obj]]:
    status = pod.get("status") or {}
    return [(str(c.get("name", "?")), c) for c in
            [*(status.get("initContainerStatuses") or []),
             *(status.get("containerStatuses") or [])]]  # fmt: skip


def _container_entries(pod: Obj) -> list[Entry]:
    name, entries = _name(pod), []
    for container, status in _containers(pod):
        state = status.get("state") or {}
        running, terminated = state.get("running") or {}, state.get("terminated") or {}
        started = running.get("startedAt") or terminated.get("startedAt")
        if started:
            entries.append(Entry(parse_time(started), "kubelet", name,
                                 f"container {container} running", NODE))
        if terminated:
            code, reason = terminated.get("exitCode"), terminated.get("reason", "")
            entries.append(Entry(parse_time(terminated.get("finishedAt")), "kubelet", name,
                                 f"container {container} ended: exit {code} ({reason})",
                                 RUNNER))
        report = parse_report(terminated.get("message") or "") if terminated else None
        if report is not None:
            said = report.message.strip()
            what = (f"posted Reduction{report.outcome.value}" if report.posted and report.outcome
                    else "did not post an outcome")
            entries.append(Entry(parse_time(terminated.get("finishedAt")), "runner", name,
                                 what + (f": {said}" if said else ""), RUNNER))
    return entries


def _pod_entries(pod: Obj, *, scheduling_events: bool) -> list[Entry]:
    name, status = _name(pod), pod.get("status") or {}
    entries = [Entry(parse_time(_meta(pod).get("creationTimestamp")), "job-controller", name,
                     "pod created", POD)]
    for condition in status.get("conditions") or []:
        kind, true = condition.get("type"), condition.get("status") == "True"
        why = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
        at = parse_time(condition.get("lastTransitionTime"))
        if kind == "PodScheduled" and not true and not scheduling_events:
            entries.append(Entry(at, "default-scheduler", name, f"not scheduled: {why}",
                                 SCHEDULING))
        elif kind == "PodScheduled" and true and not scheduling_events:
            entries.append(Entry(at, "default-scheduler", name,
                                 f"scheduled to {(pod.get('spec') or {}).get('nodeName', '?')}",
                                 SCHEDULING))
        elif kind == "DisruptionTarget" and true:
            entries.append(Entry(at, "cluster", name, f"pod to be stopped: {why}", STOPPING))
    return entries + _container_entries(pod)


def event_time(event: Obj) -> float | None:
    """When an Event last happened: its series, its own time, or the older API's."""
    series = event.get("series") or {}
    for text in (series.get("lastObservedTime"), event.get("eventTime"),
                 event.get("deprecatedLastTimestamp"), event.get("deprecatedFirstTimestamp"),
                 _meta(event).get("creationTimestamp")):  # fmt: skip
        at = parse_time(text)
        if at is not None:
            return at
    return None


def _event_entry(event: Obj) -> Entry:
    source = (event.get("reportingController")
              or (event.get("deprecatedSource") or {}).get("component") or "?")
    count = (event.get("series") or {}).get("count") or event.get("deprecatedCount") or 1
    note = str(event.get("note") or "").strip()
    text = f"{event.get('reason', '')}: {note}".strip(": ")
    if int(count) > 1:
        text += f" (x{count})"
    regarding = str((event.get("regarding") or {}).get("name", ""))
    return Entry(event_time(event), str(source), regarding, text,
                 _EVENT_STAGES.get(str(event.get("reason", "")), _SOURCE_STAGES.get(
                     str(source), NODE)))


# Where an Event comes in a run's life, by its reason, else by who reported it.
_EVENT_STAGES = {
    "Waiting": WAITED, "Suspended": WAITED, "Admitted": ADMITTED, "Resumed": STARTED,
    "SuccessfulCreate": POD, "Scheduled": SCHEDULING, "FailedScheduling": SCHEDULING,
    "Preempted": STOPPING, "Killing": STOPPING, "Cancelled": STOPPING,
    "Completed": ENDED, "BackoffLimitExceeded": ENDED, "OutcomePosted": POSTED,
    "RetryScheduled": POSTED, "RetriesExhausted": POSTED,
}  # fmt: skip
_SOURCE_STAGES = {"default-scheduler": SCHEDULING, "cluster-autoscaler": SCHEDULING,
                  "kubelet": NODE}  # fmt: skip


def _is_scheduling(event: Obj) -> bool:
    return str(event.get("reason", "")) in ("Scheduled", "FailedScheduling")


def tell(*, jobs: Iterable[Obj], pods: Iterable[Obj], events: Iterable[Obj],
         labels: Labels, now: float) -> Story:
    """Every version of a run (``jobs``), its pods and the Events about either."""
    jobs, pods, events = list(jobs), list(pods), list(events)
    by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        by_job.setdefault(str(labels_of(pod).get(JOB_NAME_LABEL, "")), []).append(pod)
    scheduled_by_event = {str((e.get("regarding") or {}).get("name", ""))
                          for e in events if _is_scheduling(e)}  # fmt: skip
    entries: list[Entry] = []
    for job in jobs:
        entries.extend(_job_entries(job, labels))
    for pod in pods:
        entries.extend(_pod_entries(pod, scheduling_events=_name(pod) in scheduled_by_event))
    entries.extend(_event_entry(e) for e in events)
    # Untimed records (a recorded verdict) go right after the last timed one of their
    # object: the Job's final condition, which comes just before the post.
    timed = sorted((e for e in entries if e.at is not None),
                   key=lambda e: (math.floor(e.at or 0), e.stage, e.at))
    for loose in (e for e in entries if e.at is None):
        last = max((i for i, e in enumerate(timed) if e.about == loose.about), default=None)
        timed.insert(len(timed) if last is None else last + 1, loose)
    holders: dict[str, str] = {}
    rows = [row_for(job, labels=labels, pods=by_job.get(_name(job), []), holders=holders,
                    now=now) for job in jobs]  # fmt: skip
    rows.sort(key=lambda r: int(r.version or 0))
    return Story(versions=rows, entries=timed)


def _clock(at: float | None) -> str:
    if at is None:
        return " " * 16
    return datetime.fromtimestamp(at, tz=UTC).strftime("%H:%M:%S.%f")[:12] + " UTC"


def format_story(story: Story, *, run: str) -> str:
    """The human view: a header per version, then the time line with offsets."""
    if not story.versions:
        return (f"no Job for {run}: it never arrived, was rejected (see dead-letters), was "
                "cancelled (its Job is deleted), or its Jobs have expired "
                "(jobs.ttl_seconds_after_finished)\n")
    lines = [f"{run}: {len(story.versions)} version(s)"]
    for row in story.versions:
        state = row.outcome if row.state == FINISHED else row.state
        lines.append(f"  v{row.version}  {row.job}  {state}" + (
            f"  {row.detail}" if row.detail else ""))
    lines.append("")
    first = next((e.at for e in story.entries if e.at is not None), None)
    width = max((len(e.source) for e in story.entries), default=6)
    for entry in story.entries:
        offset = "" if entry.at is None or first is None else f"+{entry.at - first:.1f}s"
        lines.append(f"{_clock(entry.at)}  {offset:>8}  {entry.source:<{width}}  "
                     f"{_short(entry.about, story.versions):<12}  {entry.text}")
    return "\n".join(lines) + "\n"


def _short(name: str, versions: Sequence[RunRow]) -> str:
    """``v0`` for a version's Job, ``v0 pod x7k2p`` for one of its pods: the header
    names the Jobs in full."""
    for row in versions:
        if name == row.job:
            return f"v{row.version}"
        if name.startswith(f"{row.job}-"):
            return f"v{row.version} pod {name[len(row.job) + 1:]}"
    return name


def story_json(story: Story) -> dict[str, Any]:
    return {"versions": [asdict(r) for r in story.versions],
            "entries": [asdict(e) for e in story.entries]}  # fmt: skip


_CREATED_POD = re.compile(r"Created pod: (\S+)")


def pods_named(events: Iterable[Obj]) -> set[str]:
    """The pods the Job controller said it created: a pod gone since (its outcome
    settled, the preempted or evicted one) still has Events worth telling."""
    return {match[1] for event in events if event.get("reason") == "SuccessfulCreate"
            for match in [_CREATED_POD.search(str(event.get("note") or ""))] if match}


def selector_of(labels: Labels, *, instrument: str, run: int) -> str:
    return (f"{labels.managed}=true,{labels.key('instrument')}={instrument.upper()},"
            f"{labels.key('run-number')}={run}")


def versions_only(jobs: Sequence[Obj], labels: Labels, version: int | None) -> list[Obj]:
    if version is None:
        return list(jobs)
    key = labels.key("run-version")
    return [job for job in jobs if str(labels_of(job).get(key, "")) == str(version)]

"""Checks shared by the integration, e2e and fault tests: sending runs and judging
what came back (from the broker's messages, the scripts' timeline and the Jobs)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.product import Facility, read_timeline
from devstack.queues import QueueReader
from dispatcher.identity import Labels
from dispatcher.manifests import stored_message as read_back

SELECTOR = "autoreduce.io/managed=true"
Span = tuple[float, float]  # seconds since the epoch: (start, end)


def send(stomp: StompClient, settings: BrokerSettings, body: Any, *, priority: int = 4) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    stomp.send(destination=settings.queues.pending, body=payload, priority=priority)


def outcomes(reader: QueueReader, settings: BrokerSettings, kind: str) -> list[dict[str, Any]]:
    return reader.bodies(getattr(settings.queues, kind))


def only_outcome(reader: QueueReader, settings: BrokerSettings, queue: str) -> dict[str, Any]:
    """Wait for a run's one outcome, which must be on ``queue``, and return its body.
    Started may or may not precede it; the runner waits for the broker's receipt, so
    once the process or pod has ended it has posted all it ever will."""
    q = settings.queues
    outcome_queues = {q.complete, q.error, q.skipped}
    reader.wait_for(lambda seen: any(d.destination in outcome_queues for d in seen), timeout=30)
    reader.settle(0.5)
    found = [d for d in reader.seen if d.destination in outcome_queues]
    assert len(found) == 1, [(d.destination, d.body[:200]) for d in found]
    assert found[0].destination == queue, (found[0].destination, found[0].body[:500])
    assert found[0].headers.get("persistent") == "true"
    body: dict[str, Any] = json.loads(found[0].body)
    return body


def count_outcomes(settings: BrokerSettings, n: int) -> Callable[[list[Any]], bool]:
    final = {settings.queues.complete, settings.queues.error, settings.queues.skipped}
    return lambda seen: sum(1 for d in seen if d.destination in final) >= n


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def overlaps(spans: Iterable[Span]) -> int:
    """How many spans start before an earlier-starting one has ended (touching is not
    overlapping): the rule ``exclusivity_violations`` applies to each record."""
    count, latest_end = 0, float("-inf")
    for start, end in sorted(spans):
        if start < latest_end:
            count += 1
        latest_end = max(latest_end, end)
    return count


def container_span(pod: dict[str, Any]) -> Span | None:
    """When the runner container really ran, from the kubelet's own record (whole
    seconds, rounded down on both ends: an overlap seen here is real)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        terminated = state.get("terminated") or {}
        started = terminated.get("startedAt") or (state.get("running") or {}).get("startedAt")
        if not started:
            continue
        finished = terminated.get("finishedAt")
        end = parse_time(finished).timestamp() if finished else float("inf")
        return parse_time(started).timestamp(), end
    return None


def end_unrecorded(pod: dict[str, Any]) -> bool:
    """The runner container ended with no times: the kubelet removed an evicted pod's
    container before recording how it ended, and reports ``ContainerStatusUnknown``
    (kubernetes/kubernetes#141857). Its span is then unknown, not endless."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None and not terminated.get("finishedAt"):
            return True
    return False


def http_status(port: int, path: str) -> int:
    """The status a local dispatcher's health endpoint answers (0: no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


# The Job controller's final verdicts. Since Kubernetes 1.31 each is written only once
# the Job's pods have stopped, and it is what lets the dispatcher hand the RB on
# (``dispatcher.admission.is_finished``); SuccessCriteriaMet and FailureTarget come
# earlier, while a deleted, evicted or timed-out pod may still be running.
FINAL_CONDITIONS = ("Complete", "Failed")


@dataclass(frozen=True)
class Overlap:
    """Runs of one RB that overlapped, as one of the records shows them."""

    rb: str
    record: str  # "script attempts", "runner containers" or "Job holds"
    count: int  # spans that began before an earlier one of the RB had ended
    spans: list[Span]


def job_hold(job: dict[str, Any]) -> Span | None:
    """When ``job`` held its RB, by the Job's own record (whole seconds).

    From ``startTime`` (set when admission unsuspended it, so its pod runs inside the
    span) to the time of its final Complete or Failed condition, the moment the
    dispatcher may hand the RB on; open-ended while it has none. Not ``completionTime``:
    a Failed Job has none, so a run that was killed, evicted or ran past its deadline,
    where a too-early hand-off would show, went unjudged. None for a Job never started,
    or deleted before its verdict: the dispatcher hands a deleted holder's RB on once its
    pods have stopped, which the scripts' and the containers' spans judge.
    """
    status = job.get("status") or {}
    if not status.get("startTime"):
        return None
    verdicts = [
        parse_time(c["lastTransitionTime"]).timestamp()
        for c in status.get("conditions") or []
        if c.get("type") in FINAL_CONDITIONS and c.get("status") == "True"
        and c.get("lastTransitionTime")
    ]
    if not verdicts and (job.get("metadata") or {}).get("deletionTimestamp"):
        return None
    end = max(verdicts) if verdicts else float("inf")
    return parse_time(status["startTime"]).timestamp(), end


def rb_of_run(jobs: Iterable[dict[str, Any]]) -> dict[int, str]:
    """Run number -> RB, from the Jobs' labels (every version of a run has one RB)."""
    labels = [job["metadata"]["labels"] for job in jobs]
    return {int(tag["autoreduce.io/run-number"]): tag["autoreduce.io/rb-number"] for tag in labels}


def job_holds(jobs: Iterable[dict[str, Any]]) -> dict[str, list[Span]]:
    """Each Job's ``job_hold``, by RB."""
    holds: dict[str, list[Span]] = defaultdict(list)
    for job in jobs:
        hold = job_hold(job)
        if hold is not None:
            holds[job["metadata"]["labels"]["autoreduce.io/rb-number"]].append(hold)
    return holds


def script_attempts(
    timeline: Iterable[dict[str, Any]], rb_by_run: Mapping[int, str]
) -> dict[str, list[Span]]:
    """Each attempt of a script, by RB: from its start to its last note (tick or end).

    Attempts are told apart by the id the fault suite's script notes (``pid``); the
    integration tests' script notes none, so all attempts of a run make one span. A run
    with no Job to name its RB goes under "?"."""
    attempts: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for event in timeline:
        run = int(Path(event["file"]).stem[-8:])
        key = f"{run}@{event.get('pid', '')}"
        attempts[rb_by_run.get(run, "?")].setdefault(key, []).append(event["t"])
    return {rb: sorted((min(ts), max(ts)) for ts in runs.values())
            for rb, runs in attempts.items()}  # fmt: skip


def exclusivity_violations(
    *,
    jobs: Iterable[dict[str, Any]],
    timeline: Iterable[dict[str, Any]],
    pod_spans: Mapping[str, Iterable[Span]] | None = None,
) -> list[Overlap]:
    """The one judge of "one run per RB at a time", for the integration and fault tests.

    Three records, each checked on its own: the scripts' attempts (ground truth of the
    work), the runner containers' real start and finish (``pod_spans`` by RB, when
    recorded), and the Jobs' holds (``job_hold``: the dispatcher's own rule, so a
    hand-off before the holder's verdict counts even when the scripts happened not to
    meet)."""
    jobs = list(jobs)
    records: dict[str, Mapping[str, Iterable[Span]]] = {
        "script attempts": script_attempts(timeline, rb_of_run(jobs)),
        "runner containers": pod_spans or {},
        "Job holds": job_holds(jobs),
    }
    found = []
    for record, by_rb in records.items():
        for rb, rb_spans in by_rb.items():
            spans = sorted(rb_spans)
            if count := overlaps(spans):
                found.append(Overlap(rb=rb, record=record, count=count, spans=spans))
    return found


def assert_exclusive(facility: Facility, jobs: list[Any]) -> dict[str, list[Span]]:
    """No two runs of one RB overlap (``exclusivity_violations``); returns the scripts'
    attempts by RB. ``jobs`` as listed by the client: its models or plain dicts."""
    with k8s.ApiClient() as api:
        plain = [api.sanitize_for_serialization(job) for job in jobs]
    timeline = read_timeline(facility)
    found = exclusivity_violations(jobs=plain, timeline=timeline)
    assert not found, found
    return script_attempts(timeline, rb_of_run(plain))


def stored_message(api: k8s.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    """A run's message as the dispatcher stored it (in its Job, or its ConfigMap when
    too large), read the way the product reads it back."""
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    job = api.sanitize_for_serialization(batch.read_namespaced_job(name, namespace))

    def config_map() -> dict[str, Any] | None:
        try:
            found = core.read_namespaced_config_map(name, namespace)
        except k8s.ApiException as error:
            if error.status == 404:
                return None
            raise
        return api.sanitize_for_serialization(found)  # type: ignore[no-any-return]

    return read_back(Labels("autoreduce.io"), job, config_map)

"""Checks shared by the integration, e2e and fault tests: sending runs and judging
what came back (from the broker's messages, the scripts' timeline and the Jobs)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient

from devstack.product import Facility, read_timeline
from devstack.queues import QueueReader

SELECTOR = "autoreduce.io/managed=true"


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


def overlaps(spans: Iterable[tuple[float, float]]) -> int:
    """How many spans start before an earlier-starting one has ended: the one judge of
    "one run per RB at a time", for the fault suite and the integration tests alike."""
    count, latest_end = 0, float("-inf")
    for start, end in sorted(spans):
        if start < latest_end:
            count += 1
        latest_end = max(latest_end, end)
    return count


def container_span(pod: dict[str, Any]) -> tuple[float, float] | None:
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


def assert_exclusive(facility: Facility, jobs: list[Any]) -> dict[str, list[tuple[float, float]]]:
    """No two runs of one RB overlap: from the scripts' own timeline and the Jobs."""
    rb_of = {}
    for job in jobs:
        runs = job.metadata.annotations["autoreduce.io/runs"]
        rb_of[runs] = job.metadata.labels["autoreduce.io/rb-number"]
    spans: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for event in read_timeline(facility):
        run = str(int(Path(event["file"]).stem[-8:]))
        spans[rb_of[run]].setdefault(run, []).append(event["t"])
    by_rb: dict[str, list[tuple[float, float]]] = {}
    for rb, runs in spans.items():
        intervals = sorted((min(ts), max(ts)) for ts in runs.values())
        assert overlaps(intervals) == 0, f"RB {rb}: runs overlap: {intervals}"
        by_rb[rb] = intervals
    # The Jobs' own times (1 s resolution) tell the same story.
    per_rb: dict[str, list[Any]] = defaultdict(list)
    for job in jobs:
        if job.status.start_time and job.status.completion_time:
            per_rb[job.metadata.labels["autoreduce.io/rb-number"]].append(job)
    for rb, rb_jobs in per_rb.items():
        rb_jobs.sort(key=lambda j: j.status.start_time)
        for prev, nxt in pairwise(rb_jobs):
            assert nxt.status.start_time >= prev.status.completion_time, f"RB {rb} overlap"
    return by_rb



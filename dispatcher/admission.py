"""Which run of an RB may reduce next, and whether the caps allow it (pure).

Inputs are plain Job dicts as the API returns them; outputs are decisions. The
Lease compare-and-swap that makes a decision true across replicas lives in
``leases``; this module only says what *should* happen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from dispatcher.identity import Labels

Job = dict[str, Any]


def _conditions(job: Job) -> dict[str, str]:
    return {
        c.get("type", ""): c.get("status", "")
        for c in (job.get("status") or {}).get("conditions") or []
    }


def is_finished(job: Job) -> bool:
    """The Job controller's final verdict (Complete or Failed) with no pod still stopping.

    Not ``FailureTarget``/``SuccessCriteriaMet``: those come first, while the pods of
    a deleted, evicted or timed-out run may still be running their script through the
    grace period. The final condition waits for them (Kubernetes 1.31+), and
    ``status.terminating`` says so explicitly. Pods of our own that outlive their Job
    are held by ``pods.PodCache`` as well.
    """
    conditions = _conditions(job)
    final = conditions.get("Complete") == "True" or conditions.get("Failed") == "True"
    return final and not int((job.get("status") or {}).get("terminating") or 0)


def succeeded(job: Job) -> bool:
    return is_finished(job) and _conditions(job).get("Complete") == "True"


def is_suspended(job: Job) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def is_deleting(job: Job) -> bool:
    return bool(job.get("metadata", {}).get("deletionTimestamp"))


def is_waiting(job: Job) -> bool:
    return is_suspended(job) and not is_finished(job) and not is_deleting(job)


def is_running(job: Job) -> bool:
    """Admitted and not finished: occupies its RB and a cap slot."""
    return not is_suspended(job) and not is_finished(job)


def name_of(job: Job) -> str:
    return str(job.get("metadata", {}).get("name", ""))


def queue_order(labels: Labels, job: Job) -> tuple[int, int, str]:
    """Priority first (higher sooner), then arrival at the broker, then name."""
    annotations = job.get("metadata", {}).get("annotations") or {}

    def number(key: str, default: int) -> int:
        try:
            return int(annotations.get(labels.key(key), default))
        except (TypeError, ValueError):
            return default

    return (-number("priority", 4), number("enqueued-at", 0), name_of(job))


def next_waiting(labels: Labels, jobs: Iterable[Job]) -> Job | None:
    waiting = [job for job in jobs if is_waiting(job)]
    return min(waiting, key=lambda job: queue_order(labels, job)) if waiting else None


class Action(StrEnum):
    KEEP = "keep"  # the holder is running; nothing to do
    RESUME = "resume"  # the holder was granted the RB but is still suspended
    ADMIT = "admit"  # the RB is free: hand it to the next waiting run
    RELEASE = "release"  # the RB is free and nobody waits: drop the Lease
    IDLE = "idle"  # no Lease and nobody waits


@dataclass(frozen=True)
class Plan:
    action: Action
    job: Job | None = None


def occupant(jobs: Iterable[Job]) -> Job | None:
    """A Job of the RB that our view shows running: the RB is busy whoever holds the Lease.

    Admission of its RB can wait for that Job's finish event without reading the Lease:
    nothing is written on that path, so exclusivity does not rest on this view.
    """
    return next((job for job in jobs if is_running(job) and not is_deleting(job)), None)


def free_on_arrival(*, jobs: Iterable[Job], lingering: bool) -> bool:
    """Whether a run that arrives now may be admitted directly (``dispatcher.direct``):
    every Job our view has of its RB is finished and no pod of the RB still runs.

    Only an optimisation's gate: the Lease compare-and-swap that follows decides, so a
    stale view costs a refused write, never a second run in the RB."""
    return not lingering and all(is_finished(job) for job in jobs)


def plan_rb(*, labels: Labels, holder: str | None, jobs: list[Job], lease_exists: bool) -> Plan:
    """Decide what to do for one RB given its Lease holder and its Jobs.

    A holder that no longer exists or has finished is stale: the Lease is reclaimed.
    """
    by_name = {name_of(job): job for job in jobs}
    current = by_name.get(holder or "")
    if current is not None and not is_finished(current) and not is_deleting(current):
        return Plan(Action.RESUME if is_suspended(current) else Action.KEEP, current)
    candidate = next_waiting(labels, jobs)
    if candidate is not None:
        return Plan(Action.ADMIT, candidate)
    return Plan(Action.RELEASE if lease_exists else Action.IDLE)


@dataclass(frozen=True)
class Caps:
    max_running: int | None
    per_instrument: dict[str, int]


def caps_allow(*, labels: Labels, caps: Caps, job: Job, running: Iterable[Job]) -> bool:
    """True when admitting ``job`` keeps within the global and instrument caps."""
    instrument_key = labels.key("instrument")
    counts: Counter[str] = Counter()
    total = 0
    for other in running:
        total += 1
        counts[(other.get("metadata", {}).get("labels") or {}).get(instrument_key, "")] += 1
    if caps.max_running is not None and total >= caps.max_running:
        return False
    instrument = (job.get("metadata", {}).get("labels") or {}).get(instrument_key, "")
    limit = caps.per_instrument.get(instrument)
    return limit is None or counts[instrument] < limit


def created_at(job: Job) -> float | None:
    """Seconds since the epoch of the Job's ``creationTimestamp`` (None if unreadable)."""
    text = str(job.get("metadata", {}).get("creationTimestamp") or "")
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def expired(jobs: Iterable[Job], *, now: float, ttl_s: float) -> list[Job]:
    """The Jobs created more than ``ttl_s`` seconds before ``now`` (oldest first)."""
    aged = [(created_at(job), job) for job in jobs]
    old = [(at, job) for at, job in aged if at is not None and now - at > ttl_s]
    return [job for _, job in sorted(old, key=lambda pair: pair[0])]

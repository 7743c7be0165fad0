"""What ``autoreduce status`` shows: every run grouped, counted, as text or JSON (pure).

Inputs are the plain dicts the API returns (Jobs, their Pods, the RB Leases) and
"now"; the rows themselves come from ``rows``. Nothing here does I/O, so every line
of ``autoreduce status`` can be tested with plain values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from autoreduce_cli.dead_letter import dead_letter, format_dead_letter, format_dead_letters
from autoreduce_cli.rows import (
    FINISHED,
    RUNNING,
    WAITING,
    Obj,
    RunRow,
    labels_of,
    parse_time,
    row_for,
)
from autoreduce_cli.runs import matches_run, run_from_filename
from autoreduce_cli.tables import age, table
from dispatcher.identity import Labels

# Also named here: parse_time and the dead-letter and run-message views, because the
# unit tests (tests/unit/test_cli_status.py) read every pure view as ``status.<name>``.
__all__ = [
    "Status",
    "age",
    "dead_letter",
    "format_dead_letter",
    "format_dead_letters",
    "format_status",
    "holders_of",
    "matches_run",
    "parse_time",
    "run_from_filename",
    "status_json",
    "summarize",
    "table",
]


@dataclass
class Status:
    waiting: list[RunRow] = field(default_factory=list)
    running: list[RunRow] = field(default_factory=list)
    finished: list[RunRow] = field(default_factory=list)
    finished_total: int = 0
    # instrument -> {"waiting": n, "running": n, "finished": n}
    by_instrument: dict[str, dict[str, int]] = field(default_factory=dict)
    # RB -> the Job holding it (from its Lease)
    holders: dict[str, str] = field(default_factory=dict)


def holders_of(leases: Iterable[Obj], labels: Labels) -> dict[str, str]:
    """RB number -> name of the Job its Lease names."""
    result: dict[str, str] = {}
    for lease in leases:
        rb = labels_of(lease).get(labels.key("rb-number"))
        holder = (lease.get("spec") or {}).get("holderIdentity")
        if rb and holder:
            result[str(rb)] = str(holder)
    return result


def summarize(
    *,
    jobs: Iterable[Obj],
    pods: Iterable[Obj],
    leases: Iterable[Obj],
    labels: Labels,
    now: float,
    recent: int = 10,
    instrument: str | None = None,
    rb: str | None = None,
    autoscaler: Mapping[str, str] | None = None,
) -> Status:
    """Rows for every run, grouped; finished runs limited to the ``recent`` newest."""
    by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        owner = labels_of(pod).get("batch.kubernetes.io/job-name") or labels_of(pod).get(
            "job-name"
        )
        if owner:
            by_job.setdefault(str(owner), []).append(pod)
    holders = holders_of(leases, labels)
    status = Status(holders=holders)
    counts: dict[str, Counter[str]] = {}
    for job in jobs:
        row = row_for(
            job,
            labels=labels,
            pods=by_job.get(str((job.get("metadata") or {}).get("name", "")), []),
            holders=holders,
            now=now,
            autoscaler=autoscaler,
        )
        if instrument and row.instrument != instrument.upper():
            continue
        if rb and row.rb != str(rb):
            continue
        counts.setdefault(row.instrument, Counter())[row.state] += 1
        getattr(status, row.state).append(row)
    status.waiting.sort(key=lambda r: (-r.priority, r.enqueued_ms, r.job))
    status.running.sort(key=lambda r: -(r.in_state_s or 0))
    status.finished.sort(key=lambda r: r.in_state_s if r.in_state_s is not None else 1e18)
    status.finished_total = len(status.finished)
    status.finished = status.finished[: max(recent, 0)]
    status.by_instrument = {
        name: {state: c[state] for state in (WAITING, RUNNING, FINISHED)}
        for name, c in sorted(counts.items())
    }
    if rb:
        status.holders = {k: v for k, v in holders.items() if k == str(rb)}
    return status


def _run_cells(row: RunRow) -> list[str]:
    return [row.instrument, row.rb, row.run, row.version]


def format_status(status: Status) -> str:
    """The human view of ``autoreduce status``."""
    parts: list[str] = []
    head = ["INSTRUMENT", "RB", "RUN", "VER"]
    parts.append(f"RUNNING ({len(status.running)})")
    if status.running:
        parts.append(
            table(
                [*head, "RUNNING FOR", "AGE", "JOB", "PODS"],
                [
                    [*_run_cells(r), age(r.in_state_s), age(r.age_s), r.job, r.detail]
                    for r in status.running
                ],
            )
        )
    parts.append("")
    parts.append(f"WAITING ({len(status.waiting)}, in admission order per RB)")
    if status.waiting:
        parts.append(
            table(
                [*head, "WAITING FOR", "PRIO", "JOB", "WHY"],
                [
                    [*_run_cells(r), age(r.in_state_s), str(r.priority), r.job, r.detail]
                    for r in status.waiting
                ],
            )
        )
    parts.append("")
    shown = len(status.finished)
    parts.append(f"RECENTLY FINISHED ({shown} of {status.finished_total})")
    if status.finished:
        parts.append(
            table(
                [*head, "OUTCOME", "ENDED", "JOB", "DETAIL"],
                [
                    [*_run_cells(r), r.outcome, f"{age(r.in_state_s)} ago", r.job, r.detail]
                    for r in status.finished
                ],
            )
        )
    parts.append("")
    parts.append("BY INSTRUMENT")
    parts.append(
        table(
            ["INSTRUMENT", "WAITING", "RUNNING", "FINISHED"],
            [
                [name, str(c[WAITING]), str(c[RUNNING]), str(c[FINISHED])]
                for name, c in status.by_instrument.items()
            ]
            or [["-", "0", "0", "0"]],
        )
    )
    if status.holders:
        parts.append("")
        parts.append("RB HELD BY")
        parts.append(table(["RB", "JOB"], sorted(status.holders.items())))
    return "\n".join(parts).rstrip() + "\n"


def status_json(status: Status) -> dict[str, Any]:
    """The machine view (``-o json``): the same rows, ages in seconds."""
    return {
        "running": [asdict(r) for r in status.running],
        "waiting": [asdict(r) for r in status.waiting],
        "finished": [asdict(r) for r in status.finished],
        "finished_total": status.finished_total,
        "by_instrument": status.by_instrument,
        "holders": status.holders,
    }

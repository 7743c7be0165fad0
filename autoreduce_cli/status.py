"""What the operator sees: runs waiting, running and finished, as tables or JSON (pure).

Inputs are the plain dicts the API returns (Jobs, their Pods, the RB Leases) and
"now"; outputs are rows and text. Nothing here does I/O, so every line of
``autoreduce status`` can be tested with plain values.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from dispatcher import admission, failures
from dispatcher.identity import Labels
from dispatcher.outcome_state import OUTCOME_KEY, OutcomeState

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


def age(seconds: float | None) -> str:
    """kubectl-style age: 45s, 3m12s, 2h5m, 4d3h ("-" when unknown)."""
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86_400}d{(s % 86_400) // 3600}h"


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


def _labels_of(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _annotations_of(obj: Obj) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}




def _finish(job: Obj, labels: Labels, pods: Sequence[Obj]) -> tuple[str, str]:
    """(outcome, detail) of a finished Job."""
    claimed = _annotations_of(job).get(labels.key(OUTCOME_KEY), "")
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    for pod in pods:
        report = failures.runner_report(dict(pod))
        if report is not None and report.outcome is not None:
            detail = report.message or (
                "output in " + ", ".join(report.reduction_data) if report.reduction_data else "")
            return report.outcome.value, detail[:200]
    if claimed == OutcomeState.CANCELLED:
        return "Cancelled", "cancelled by a cancel message"
    if admission.succeeded(dict(job)):
        return "Complete", ""
    failed = conditions.get("Failed") or conditions.get("FailureTarget") or {}
    detail = f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": ")
    return "Failed", detail[:200]


def _state(job: Obj) -> str:
    if admission.is_finished(dict(job)):
        return FINISHED
    if admission.is_suspended(dict(job)):
        return WAITING
    return RUNNING


def row_for(
    job: Obj, *, labels: Labels, pods: Sequence[Obj], holders: Mapping[str, str], now: float
) -> RunRow:
    """One Job as a row (``pods``: this Job's pods; ``holders``: RB -> holding Job)."""
    meta = job.get("metadata") or {}
    tags = _labels_of(job)
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
        phases = [
            f"{(p.get('metadata') or {}).get('name', '?')} "
            f"{(p.get('status') or {}).get('phase', '?')}"
            for p in running_pods
        ]
        detail = ", ".join(phases) or "starting"
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


def holders_of(leases: Iterable[Obj], labels: Labels) -> dict[str, str]:
    """RB number -> name of the Job its Lease names."""
    result: dict[str, str] = {}
    for lease in leases:
        rb = _labels_of(lease).get(labels.key("rb-number"))
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
) -> Status:
    """Rows for every run, grouped; finished runs limited to the ``recent`` newest."""
    by_job: dict[str, list[Obj]] = {}
    for pod in pods:
        owner = _labels_of(pod).get("batch.kubernetes.io/job-name") or _labels_of(pod).get(
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


# -- rendering ----------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart (the last column is not padded)."""
    materialised = [list(map(str, row)) for row in rows]
    widths = [len(h) for h in headers]
    for row in materialised:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *materialised]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


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


# -- messages -------------------------------------------------------------------------


def run_from_filename(path: str) -> tuple[str | None, int | None]:
    """(instrument, run) from a raw file name like ``WISH00044001.nxs`` (pure).

    Legacy manual submission took both from the file name; either may be None
    when the name does not follow the ``<INSTRUMENT><digits>.<ext>`` pattern.
    """
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]
    letters = stem.rstrip("0123456789")
    digits = stem[len(letters) :]
    instrument = letters.strip("_-").upper() or None
    return instrument, int(digits) if digits else None


def matches_run(body: Mapping[str, Any], *, instrument: str, run: int, version: int) -> bool:
    """Whether an outcome message is about this run (consumers match it the same way)."""
    runs = body.get("run_number")
    first = min(runs) if isinstance(runs, list) and runs else runs
    try:
        return (
            str(body.get("instrument", "")).upper() == instrument.upper()
            and int(first) == run  # type: ignore[arg-type]
            and int(body.get("run_version") or 0) == version
        )
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    timestamp_ms: int
    reason: str
    instrument: str
    run: str
    body: str
    headers: dict[str, str]


def dead_letter(headers: Mapping[str, str], body: bytes) -> DeadLetter:
    """A DLQ message as the operator sees it (the body may not even be JSON)."""
    text = body.decode("utf-8", errors="replace")
    instrument, run = "", ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        instrument = str(parsed.get("instrument") or "")
        run = str(parsed.get("run_number") if parsed.get("run_number") is not None else "")
    try:
        stamp = int(headers.get("timestamp", "0"))
    except ValueError:
        stamp = 0
    return DeadLetter(
        message_id=str(headers.get("message-id", "")),
        timestamp_ms=stamp,
        reason=str(headers.get("autoreduce-reason", "")),
        instrument=instrument,
        run=run,
        body=text,
        headers=dict(headers),
    )


def format_dead_letters(letters: Sequence[DeadLetter], *, now: float) -> str:
    if not letters:
        return "dead-letter queue is empty\n"
    rows = [
        [
            d.message_id,
            age(now - d.timestamp_ms / 1000) if d.timestamp_ms else "-",
            d.instrument or "-",
            d.run or "-",
            d.reason[:100],
        ]
        for d in letters
    ]
    return table(["MESSAGE-ID", "AGE", "INSTRUMENT", "RUN", "REASON"], rows) + "\n"


def format_dead_letter(letter: DeadLetter) -> str:
    try:
        body = json.dumps(json.loads(letter.body), indent=2, sort_keys=True)
    except ValueError:
        body = letter.body
    headers = "\n".join(f"  {k}: {v}" for k, v in sorted(letter.headers.items()))
    return (
        f"message-id: {letter.message_id}\n"
        f"reason (autoreduce-reason): {letter.reason or '-'}\n"
        f"headers:\n{headers}\nbody:\n{body}\n"
    )

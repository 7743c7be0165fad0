"""Sending a run to the pending queue and following it to its outcome.

``submit`` and ``retry`` share this: both validate and send a run message, then
print what they sent or follow the run's Job until its outcome is on an outcome
queue (or, if a consumer took it first, until the Job tells how it ended).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from autoreduce_common.messages import MessageError, encode, parse_run

from autoreduce_cli.errors import EXIT_OK, EXIT_RUN_FAILED, EXIT_TIMEOUT, EXIT_USAGE, CliError
from autoreduce_cli.queues import browse
from autoreduce_cli.rows import FINISHED, WAITING, row_for
from autoreduce_cli.runs import matches_run
from dispatcher.identity import RunKey, job_name, lease_name, run_key

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context

FINAL = ("complete", "error", "skipped")
# Seconds after the Job finished before we stop looking for its outcome message.
CONSUMED_GRACE_S = 15.0


def send_run(ctx: Context, message: dict[str, Any], *, priority: int) -> RunKey:
    """Send a run the dispatcher would accept (else exit 2 with its reason)."""
    try:
        _, parsed = parse_run(encode(message))
    except MessageError as error:
        raise CliError(f"the run would be refused: {error.reason}", EXIT_USAGE) from error
    ctx.broker().send(
        destination=ctx.settings.broker.queues.pending, body=encode(message), priority=priority
    )
    return run_key(parsed)


def finish_send(ctx: Context, args: argparse.Namespace, key: RunKey, what: str) -> int:
    """Say what was sent or, unless --no-wait, follow the run: exit 1 if it ends in error."""
    sent = {"sent": what, "run": key.describe(), "job": job_name(key)}
    if not args.wait:
        ctx.emit(f"{what}: {key.describe()} -> Job {job_name(key)}", sent)
        return EXIT_OK
    ctx.progress(f"{what}: {key.describe()}; following Job {job_name(key)} (Ctrl-C stops watching)")
    result = {**sent, **follow(ctx, key, timeout=args.timeout)}
    ctx.emit(f"{result['outcome']}: {key.describe()}", result)
    return EXIT_RUN_FAILED if result["outcome"] == "Error" else EXIT_OK


def _outcomes(ctx: Context, key: RunKey) -> dict[str, dict[str, Any]]:
    """Outcome messages of this run still on the outcome queues (browsed, not consumed)."""
    queues = ctx.settings.broker.queues
    found: dict[str, dict[str, Any]] = {}
    for name in ("started", *FINAL):
        for delivery in browse(ctx.broker(), getattr(queues, name)):
            try:
                body = json.loads(delivery.body)
            except ValueError:
                continue
            if isinstance(body, dict) and matches_run(
                body, instrument=key.instrument, run=key.first_run, version=key.version
            ):
                found[name] = body
    return found


def _job_state(ctx: Context, name: str) -> tuple[str, str]:
    job = ctx.job(name)
    if job is None:
        return "absent", ""
    row = row_for(job, labels=ctx.labels, pods=[], holders={}, now=time.time())
    if row.state == WAITING:
        lease = ctx.lease(lease_name(row.rb))
        holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
        why = f"RB {row.rb} held by {holder}" if holder and holder != name else "for a slot"
        return "waiting", why
    return row.state, row.outcome


def follow(ctx: Context, key: RunKey, *, timeout: float) -> dict[str, Any]:
    """Show the run's progress until its outcome is on an outcome queue."""
    name = job_name(key)
    started = time.monotonic()
    last: tuple[str, str] | None = None
    announced_start = False
    finished_at: float | None = None
    while True:
        elapsed = time.monotonic() - started
        state = _job_state(ctx, name)
        if state != last:
            where = f" ({state[1]})" if state[1] else ""
            ctx.progress(f"[{elapsed:6.1f}s] Job {name}: {state[0]}{where}")
            last = state
        if state[0] == FINISHED and finished_at is None:
            finished_at = elapsed
        found = _outcomes(ctx, key)
        if "started" in found and not announced_start:
            ctx.progress(f"[{elapsed:6.1f}s] ReductionStarted")
            announced_start = True
        final = next((kind for kind in FINAL if kind in found), None)
        if final is not None:
            body = found[final]
            detail = body.get("message") or ", ".join(body.get("reduction_data") or [])
            ctx.progress(f"[{elapsed:6.1f}s] Reduction{final.capitalize()}: {detail}")
            return {
                "job": name,
                "outcome": final.capitalize(),
                "message": body.get("message"),
                "reduction_data": body.get("reduction_data"),
                "seconds": round(elapsed, 1),
            }
        if finished_at is not None and elapsed - finished_at > CONSUMED_GRACE_S:
            # A consumer (the web app) took the outcome before we could browse it:
            # say what the Job and the runner's termination message tell.
            return _from_job(ctx, name, elapsed)
        if elapsed > timeout:
            raise CliError(f"no outcome for {key.describe()} after {timeout:.0f}s", EXIT_TIMEOUT)
        time.sleep(1.0)


def _from_job(ctx: Context, name: str, elapsed: float) -> dict[str, Any]:
    job = ctx.job(name) or {}
    pods = ctx.pods(selector=f"batch.kubernetes.io/job-name={name}")
    row = row_for(job, labels=ctx.labels, pods=pods, holders={}, now=time.time())
    outcome = "Error" if row.outcome in ("Failed", "Cancelled") else row.outcome
    ctx.progress(
        f"[{elapsed:6.1f}s] {row.outcome} (from the Job; the outcome message was consumed)"
    )
    return {
        "job": name,
        "outcome": outcome,
        "message": row.detail or None,
        "reduction_data": None,
        "seconds": round(elapsed, 1),
        "source": "job",
    }

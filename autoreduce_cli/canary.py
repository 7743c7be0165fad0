"""``python -m autoreduce_cli.canary``: the chart's ``helm test`` canary.

One run through the whole path (broker, dispatcher, Job, runner pod, outcome) that
passes only when that run's single outcome is ReductionSkipped.

The run has an instrument and RB number of its own (chart values ``helmTest.*``), so
it never waits behind a real experiment nor holds one up, and a run number taken from
the clock: every canary is a new run with a new Job name (a reused name would meet the
previous canary's Job and be taken as already done). Its data path is never opened and
its script lists the run in ``SKIP_RUNS``: the runner pod checks the path against its
archive roots, proves the output volume writable (the run's log directory), loads the
script in its child process and reports ReductionSkipped. Nothing is reduced; the only
file left is the run's (empty) script log in the canary RB's ``reduction_log`` folder.

Watching without stealing. ActiveMQ Classic selectors cannot name the outcome-id
header (``-`` is not allowed in a selector identifier), so the canary cannot subscribe
to its own outcome messages alone, and consuming from the shared outcome queues would
take other runs' messages from the web app. It never consumes there: it *browses*
them (a browser subscription leaves every message in place) for messages about its
run. When a live consumer (the web app) takes them first, the evidence is the runner's
termination report on the Job's pod: outcome Skipped, stage ``posted`` (the broker
confirmed it). The canary prints which evidence it used. It reads the Job and its
pods with the dispatcher's ServiceAccount (``get`` jobs, ``list`` pods: rights that
account has anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoreduce_common.messages import MessageError, Outcome, encode, parse_run
from autoreduce_common.pod_contract import TerminationReport
from autoreduce_common.stomp_client import BrokerError, Delivery

from autoreduce_cli.cli import Context
from autoreduce_cli.errors import EXIT_API, EXIT_BROKER, EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE
from autoreduce_cli.queues import browse, take
from autoreduce_cli.rows import FINISHED, row_for
from autoreduce_cli.runs import matches_run
from dispatcher import failures
from dispatcher.config import load_settings
from dispatcher.identity import Labels, RunKey, job_name
from dispatcher.kube import KubeError

EXPECTED = Outcome.SKIPPED
FINAL = (Outcome.COMPLETE, Outcome.ERROR, Outcome.SKIPPED)
# JMS priority of the canary's run: ahead of a backlog (an operator runs `helm test`
# to know now; the run takes seconds and reduces nothing).
PRIORITY = 9
POLL_S = 1.0
# Seconds after the first final outcome before looking again for a second one.
SETTLE_S = 3.0
# Seconds after the Job finished before the termination report is taken as the
# evidence (the outcome message may still be on its way to the queue).
CONSUMED_GRACE_S = 10.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    text: str


# -- pure: the run and the judgement ----------------------------------------------------


def canary_run(now: float) -> int:
    """A new run number (and so Job name) every time: centiseconds of the clock, within
    the contract's run_number range (at most 10**12) until the year 2286."""
    return int(now * 100)


def canary_script(run: int) -> str:
    """A reduce.py the runner skips: it loads it, finds the run in SKIP_RUNS, reports."""
    return (
        "# The helm test canary: this run is skipped, main() never runs.\n"
        f"SKIP_RUNS = [{run}]\n\n\n"
        "def main(input_file, output_dir):\n"
        '    raise RuntimeError("the canary run is in SKIP_RUNS: main() must not run")\n'
    )


def canary_message(*, instrument: str, rb: str, run: int, data: str) -> dict[str, Any]:
    return {
        "data": data,
        "facility": "ISIS",
        "instrument": instrument.upper(),
        "rb_number": rb,
        "run_number": run,
        "run_version": 0,
        "reduction_script": canary_script(run),
        "reduction_arguments": {"standard_vars": {}, "advanced_vars": {}},
        "started_by": -1,
        "description": "helm test canary",
    }


def canary_key(*, instrument: str, rb: str, run: int) -> RunKey:
    return RunKey(facility="ISIS", instrument=instrument.upper(), runs=(run,), version=0,
                  rb_number=rb)  # fmt: skip


def judge_messages(finals: list[tuple[Outcome, dict[str, Any]]]) -> Verdict:
    """The final outcome messages of the canary's run found on the queues (>= 1)."""
    kinds = ", ".join(f"Reduction{kind.value}" for kind, _ in finals)
    if len(finals) > 1:
        return Verdict(False, f"{len(finals)} final outcomes for one run ({kinds}): want one")
    kind, body = finals[0]
    if kind is not EXPECTED:
        detail = body.get("message") or ", ".join(body.get("reduction_data") or [])
        return Verdict(False, f"Reduction{kind.value}, want Reduction{EXPECTED.value}: {detail}")
    return Verdict(True, f"Reduction{kind.value} came back: {body.get('message') or ''}".strip())


def judge_report(report: TerminationReport | None, *, job_state: str) -> Verdict:
    """A finished Job whose outcome message was not (or no longer) on the queues."""
    if report is None:
        return Verdict(False, f"the Job ended ({job_state}) without a runner termination "
                              "report and no outcome message was found")  # fmt: skip
    kind = report.outcome.value if report.outcome is not None else "none"
    if report.outcome is not EXPECTED:
        return Verdict(False, f"the runner reported Reduction{kind}, want "
                              f"Reduction{EXPECTED.value}: {report.message}")  # fmt: skip
    if not report.posted:
        return Verdict(False, f"the runner decided Reduction{kind} but the broker did not "
                              f"confirm it (stage {report.stage.value})")  # fmt: skip
    return Verdict(True, f"Reduction{kind} posted (the broker confirmed it to the runner) "
                         "and taken by another consumer before the canary could browse it: "
                         f"{report.message}")  # fmt: skip


def timeout_text(*, job: str, state: str, detail: str, timeout: float, pending: str,
                 withdrawn: bool) -> str:  # fmt: skip
    """Why no outcome came back, from what the Job shows."""
    head = f"no outcome for the canary run after {timeout:.0f} s"
    if state == "absent":
        gone = "withdrawn from" if withdrawn else "maybe still on"
        return (f"{head}: no Job {job} was made, so no dispatcher took the run from "
                f"{pending} (are dispatcher pods running and Ready?); the run was {gone} "
                "the queue")
    where = f" ({detail})" if detail else ""
    return f"{head}: Job {job} is {state}{where}"


# -- the shell: broker and API ---------------------------------------------------------


def final_outcomes(ctx: Context, key: RunKey) -> list[tuple[Outcome, dict[str, Any]]]:
    """Final outcome messages about this run on the outcome queues, browsed (not consumed)."""
    found = []
    for kind in FINAL:
        queue = getattr(ctx.settings.broker.queues, kind.value.lower())
        for delivery in browse(ctx.broker(), queue):
            body = _body(delivery)
            if body is not None and matches_run(
                body, instrument=key.instrument, run=key.first_run, version=key.version
            ):
                found.append((kind, body))
    return found


def _body(delivery: Delivery) -> dict[str, Any] | None:
    try:
        body = json.loads(delivery.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def job_state(ctx: Context, name: str) -> tuple[str, str, TerminationReport | None]:
    """(state, detail, runner report) of the canary's Job; state "absent" if none."""
    job = ctx.job(name)
    if job is None:
        return "absent", "", None
    pods = ctx.pods(selector=f"batch.kubernetes.io/job-name={name}")
    row = row_for(job, labels=ctx.labels, pods=pods, holders={}, now=time.time())
    reports = [r for r in (failures.runner_report(dict(p)) for p in pods) if r is not None]
    return row.state, row.detail, reports[0] if reports else None


def withdraw(ctx: Context, message: dict[str, Any]) -> bool:
    """Take the canary's own run back off the pending queue (by its message id)."""
    pending = ctx.settings.broker.queues.pending
    for delivery in browse(ctx.broker(), pending):
        if _body(delivery) == message:
            taken = take(ctx.broker(), pending, delivery.headers.get("message-id", ""))
            return taken is not None and ctx.broker().ack(taken)
    return False


def browse_outcomes(ctx: Context, key: RunKey, *, elapsed: float
                    ) -> list[tuple[Outcome, dict[str, Any]]] | None:  # fmt: skip
    """``final_outcomes``, or None when the broker connection dropped under the browse.

    A missed heartbeat on a loaded node drops the connection for a moment and the
    client reconnects by itself; failing the canary on that would page an operator
    for a blip the dispatcher rode out too. The next poll browses again, and the
    timeout still bounds the whole wait."""
    try:
        return final_outcomes(ctx, key)
    except BrokerError as error:
        ctx.progress(f"[{elapsed:6.1f}s] broker: {error}; browsing again")
        return None


def watch(ctx: Context, key: RunKey, message: dict[str, Any], *, timeout: float) -> Verdict:
    name = job_name(key)
    started = time.monotonic()
    finished_at: float | None = None
    last = ""
    while True:
        elapsed = time.monotonic() - started
        finals = browse_outcomes(ctx, key, elapsed=elapsed)
        if finals:
            time.sleep(SETTLE_S)
            again = browse_outcomes(ctx, key, elapsed=time.monotonic() - started)
            return judge_messages(again or finals)
        state, detail, report = job_state(ctx, name)
        if state != last:
            where = f" ({detail})" if detail else ""
            ctx.progress(f"[{elapsed:6.1f}s] Job {name}: {state}{where}")
            last = state
        if state == FINISHED:
            finished_at = elapsed if finished_at is None else finished_at
            if elapsed - finished_at > CONSUMED_GRACE_S:
                return judge_report(report, job_state=detail or state)
        if elapsed > timeout:
            withdrawn = state == "absent" and withdraw(ctx, message)
            return Verdict(False, timeout_text(
                job=name, state=state, detail=detail, timeout=timeout,
                pending=ctx.settings.broker.queues.pending, withdrawn=withdrawn))
        time.sleep(POLL_S)


def run_canary(ctx: Context, *, instrument: str, rb: str, data: str, timeout: float) -> Verdict:
    run = canary_run(time.time())
    key = canary_key(instrument=instrument, rb=rb, run=run)
    message = canary_message(instrument=instrument, rb=rb, run=run, data=data)
    try:
        parse_run(encode(message))  # the dispatcher's own check, before anything is sent
    except MessageError as error:
        return Verdict(False, f"the canary run would be refused: {error.reason}")
    ctx.broker().send(destination=ctx.settings.broker.queues.pending, body=encode(message),
                      priority=PRIORITY)  # fmt: skip
    ctx.progress(f"canary: sent {key.describe()} to {ctx.settings.broker.queues.pending}; "
                 f"want Reduction{EXPECTED.value} within {timeout:.0f} s (Job {job_name(key)})")
    return watch(ctx, key, message, timeout=timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autoreduce_cli.canary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=os.environ.get("AUTOREDUCE_CONFIG_FILE"),
                   help="the dispatcher's settings file (AUTOREDUCE_* variables override it)")
    p.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"),
                   help="default: in-cluster credentials")
    p.add_argument("--instrument", default="CANARY")
    p.add_argument("--rb", default="CANARY", help="the canary's own RB number")
    p.add_argument("--data", default="/isis/autoreduce-canary.nxs",
                   help="data path the run names (never opened; within the archive roots)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the outcome")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
    except (OSError, ValueError) as error:
        print(f"canary: bad settings: {error}", file=sys.stderr)
        return EXIT_USAGE
    ctx = Context(settings=settings, labels=Labels(settings.jobs.label_prefix), output="text",
                  kubeconfig=args.kubeconfig, namespace=settings.jobs.namespace)  # fmt: skip
    try:
        verdict = run_canary(ctx, instrument=args.instrument, rb=args.rb, data=args.data,
                             timeout=args.timeout)  # fmt: skip
    except BrokerError as error:
        print(f"canary FAILED: broker: {error}", file=sys.stderr)
        return EXIT_BROKER
    except KubeError as error:
        print(f"canary FAILED: Kubernetes API: {error}", file=sys.stderr)
        return EXIT_API
    finally:
        ctx.close()
    print(f"canary {'passed' if verdict.ok else 'FAILED'}: {verdict.text}", flush=True)
    return EXIT_OK if verdict.ok else EXIT_RUN_FAILED


if __name__ == "__main__":
    sys.exit(main())

"""``autoreduce status``: runs waiting, running and recently finished, once or watched."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from autoreduce_cli.errors import EXIT_OK
from autoreduce_cli.rows import AUTOSCALER_REASONS, autoscaler_notes
from autoreduce_cli.status import Status, format_status, status_json, summarize

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context


def _status(ctx: Context, args: argparse.Namespace) -> Status:
    selector = f"{ctx.labels.managed}=true"
    pods = ctx.pods(selector=selector)
    # The cluster autoscaler's word on pending pods: one list per reason, and only
    # when a pod is pending (a quiet cluster costs no Event reads).
    pending = any((p.get("status") or {}).get("phase") == "Pending" for p in pods)
    events = [e for reason in AUTOSCALER_REASONS for e in ctx.events(reason=reason)
              ] if pending else []
    return summarize(
        jobs=ctx.jobs(selector=selector),
        pods=pods,
        autoscaler=autoscaler_notes(events),
        leases=ctx.leases(selector=selector),
        labels=ctx.labels,
        now=time.time(),
        recent=args.recent,
        instrument=args.instrument,
        rb=args.rb,
    )


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    shown = 0
    while True:
        current = _status(ctx, args)
        header = f"namespace {ctx.namespace} at {time.strftime('%H:%M:%S')}\n"
        if ctx.json:
            payload = {"namespace": ctx.namespace, "time": time.time(), **status_json(current)}
            # --watch under -o json: one JSON document per line, a stream.
            text = json.dumps(payload, default=str)
            print(text if args.watch is not None else json.dumps(payload, indent=2), flush=True)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(header + format_status(current), flush=True)
        shown += 1
        if args.watch is None or (args.count and shown >= args.count):
            return EXIT_OK
        time.sleep(args.watch)

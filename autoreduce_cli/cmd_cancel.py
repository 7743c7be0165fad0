"""``autoreduce cancel``: a cancel message for a waiting or running run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from autoreduce_common.messages import encode

from autoreduce_cli.errors import EXIT_OK

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context

CANCEL_PRIORITY = 9  # a cancel should not queue behind the burst it cancels


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    message = {
        "cancel": True,
        "facility": args.facility,
        "instrument": args.instrument.upper(),
        "rb_number": args.rb,
        "run_number": args.run,
        "run_version": args.version,
    }
    ctx.broker().send(
        destination=ctx.settings.broker.queues.pending,
        body=encode(message),
        priority=CANCEL_PRIORITY,
    )
    describe = f"{args.instrument.upper()} run {args.run} v{args.version} (RB {args.rb})"
    ctx.emit(f"cancel sent for {describe}", {"cancel": True, **message, "run": describe})
    return EXIT_OK

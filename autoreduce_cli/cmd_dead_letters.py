"""``autoreduce dead-letters``: list, show and requeue what the dispatcher refused."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from autoreduce_cli.dead_letter import (
    DeadLetter,
    dead_letter,
    format_dead_letter,
    format_dead_letters,
)
from autoreduce_cli.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, CliError
from autoreduce_cli.queues import browse, take

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context


def _letters(ctx: Context) -> list[DeadLetter]:
    return [
        dead_letter(d.headers, d.body)
        for d in browse(ctx.broker(), ctx.settings.broker.queues.dead_letter)
    ]


def cmd_dlq_list(ctx: Context, args: argparse.Namespace) -> int:
    letters = _letters(ctx)
    machine = [
        {k: v for k, v in asdict(d).items() if k not in {"body", "headers"}} for d in letters
    ]
    ctx.emit(format_dead_letters(letters, now=time.time()), machine)
    return EXIT_OK


def cmd_dlq_show(ctx: Context, args: argparse.Namespace) -> int:
    letter = next((d for d in _letters(ctx) if d.message_id == args.id), None)
    if letter is None:
        raise CliError(f"no message {args.id} on the dead-letter queue", EXIT_NOT_FOUND)
    ctx.emit(format_dead_letter(letter), asdict(letter))
    return EXIT_OK


def cmd_dlq_requeue(ctx: Context, args: argparse.Namespace) -> int:
    queues = ctx.settings.broker.queues
    ids = [d.message_id for d in _letters(ctx)] if args.all else list(args.ids)
    if not ids:
        raise CliError("name message ids, or pass --all", EXIT_USAGE)
    moved, missing = [], []
    for message_id in ids:
        delivery = take(ctx.broker(), queues.dead_letter, message_id)
        if delivery is None:
            missing.append(message_id)
            continue
        try:
            priority = int(delivery.headers.get("original-priority", "4"))
        except ValueError:
            priority = 4
        # Send first, then ack: a crash in between leaves a duplicate, which the
        # dispatcher's idempotent Job names absorb; the reverse could lose the run.
        ctx.broker().send(destination=queues.pending, body=delivery.body, priority=priority)
        ctx.broker().ack(delivery)
        moved.append(message_id)
    human = "".join(f"requeued {m} to {queues.pending}\n" for m in moved)
    human += "".join(f"not on the dead-letter queue: {m}\n" for m in missing)
    ctx.emit(human or "nothing requeued\n", {"requeued": moved, "missing": missing})
    return EXIT_OK if not missing else EXIT_NOT_FOUND

"""``autoreduce submit``: a run sent by hand, as legacy manual submission did."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoreduce_cli.errors import EXIT_USAGE, CliError
from autoreduce_cli.follow import finish_send, send_run
from autoreduce_cli.runs import run_from_filename

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context

MANUAL_PRIORITY = 1  # legacy manual submission


def cmd_submit(ctx: Context, args: argparse.Namespace) -> int:
    guessed_instrument, guessed_run = run_from_filename(args.data)
    instrument = args.instrument or guessed_instrument
    run = args.run if args.run is not None else guessed_run
    if not instrument or run is None:
        raise CliError("cannot tell instrument and run from the file name: pass them", EXIT_USAGE)
    try:
        script = Path(args.script).read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read the script: {error}", EXIT_USAGE) from error
    message: dict[str, Any] = {
        "data": args.data,
        "facility": args.facility,
        "instrument": instrument.upper(),
        "rb_number": args.rb,
        "run_number": run,
        "run_version": args.version,
        "reduction_script": script,
        "reduction_arguments": _arguments(args.arguments),
        "started_by": -1,  # legacy: manual submission
    }
    if args.description:
        message["description"] = args.description
    key = send_run(ctx, message, priority=MANUAL_PRIORITY)
    return finish_send(ctx, args, key, "submitted")


def _arguments(text: str | None) -> dict[str, Any]:
    if not text:
        return {"standard_vars": {}, "advanced_vars": {}}
    source = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    try:
        loaded = json.loads(source)
    except ValueError as error:
        raise CliError(f"--arguments is not JSON: {error}", EXIT_USAGE) from error
    if not isinstance(loaded, dict):
        raise CliError("--arguments must be a JSON object", EXIT_USAGE)
    loaded.setdefault("standard_vars", {})
    loaded.setdefault("advanced_vars", {})
    return loaded

"""``autoreduce render``: the Job a run message would make, optionally checked by the API."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from autoreduce_common.messages import MessageError, parse_run

from autoreduce_cli.errors import EXIT_OK, EXIT_USAGE, CliError
from dispatcher.identity import run_key
from dispatcher.manifests import Arrival, TemplateError, load_template, render_job

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context


def cmd_render(ctx: Context, args: argparse.Namespace) -> int:
    try:
        _, message = parse_run(Path(args.message).read_bytes())
        template = load_template(ctx.settings.jobs.template_path)
    except OSError as error:
        raise CliError(f"cannot read: {error}", EXIT_USAGE) from error
    except MessageError as error:
        raise CliError(
            f"the dispatcher would dead-letter this message: {error.reason}", EXIT_USAGE
        ) from error
    except TemplateError as error:
        raise CliError(str(error), EXIT_USAGE) from error
    if message.cancel:
        raise CliError("a cancel message makes no Job", EXIT_USAGE)
    job = render_job(
        settings=ctx.settings,
        template=template,
        key=run_key(message),
        arrival=Arrival(priority=args.priority, enqueued_ms=int(time.time() * 1000), message_id=""),
    )
    if args.dry_run_server:
        ctx.dry_run_job(job)  # KubeError (Invalid: what is wrong) -> exit 4
        print(
            f"server-side dry run: the API accepts Job {job['metadata']['name']}", file=sys.stderr
        )
    ctx.emit(yaml.safe_dump(job, sort_keys=False), job)
    return EXIT_OK

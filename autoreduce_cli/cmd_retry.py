"""``autoreduce retry`` (alias ``rerun``): a Job's stored message sent as the next version."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from autoreduce_common.messages import rerun

from autoreduce_cli.errors import EXIT_NOT_FOUND, EXIT_USAGE, CliError
from autoreduce_cli.follow import finish_send, send_run
from dispatcher.identity import RunKey, job_name
from dispatcher.manifests import stored_message

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context

RERUN_PRIORITY = 0  # reruns and retries


def _key_of_job(ctx: Context, args: argparse.Namespace) -> str:
    if args.job:
        return str(args.job)
    if not (args.instrument and args.run is not None):
        raise CliError("name the Job, or give --instrument, --run and --version", EXIT_USAGE)
    key = RunKey(
        facility=args.facility,
        instrument=args.instrument.upper(),
        runs=(args.run,),
        version=args.version,
        rb_number="",
    )
    return job_name(key)


def _next_version(ctx: Context, raw: dict[str, Any]) -> int:
    """One past the highest version of this run the cluster still knows (at least v+1)."""
    current = int(raw.get("run_version") or 0)
    runs = raw.get("run_number")
    first = min(runs) if isinstance(runs, list) else runs
    selector = ctx.labels.selector(
        instrument=str(raw.get("instrument", "")).upper(), run_number=str(int(str(first)))
    )
    jobs = ctx.jobs(selector=selector)
    versions = [current]
    for job in jobs:
        tags = (job.get("metadata") or {}).get("labels") or {}
        try:
            versions.append(int(tags.get(ctx.labels.key("run-version"), "0")))
        except ValueError:
            continue
    return max(versions) + 1


def cmd_retry(ctx: Context, args: argparse.Namespace) -> int:
    name = _key_of_job(ctx, args)
    raw = stored_message(ctx.labels, ctx.job(name), lambda: ctx.config_map(name))
    if raw is None:
        raise CliError(
            f"no message stored for Job {name} (gone with its Job, or not JSON)", EXIT_NOT_FOUND
        )
    version = _next_version(ctx, raw)
    message = rerun(raw, version=version, description=args.description)
    key = send_run(ctx, message, priority=RERUN_PRIORITY)
    return finish_send(ctx, args, key, f"resubmitted {name} as version {version}")

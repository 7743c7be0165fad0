"""``autoreduce explain``: one run's whole story, every version, in time order."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from autoreduce_cli.errors import EXIT_OK, EXIT_RUN_FAILED
from autoreduce_cli.rows import labels_of
from autoreduce_cli.story import (
    format_story,
    pods_named,
    selector_of,
    story_json,
    tell,
    versions_only,
)

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    instrument = args.instrument.upper()
    selector = selector_of(ctx.labels, instrument=instrument, run=args.run)
    jobs = versions_only(ctx.jobs(selector=selector), ctx.labels, args.version)
    pods = [pod for pod in ctx.pods(selector=selector)
            if not jobs or labels_of(pod).get("batch.kubernetes.io/job-name")
            in {(job.get("metadata") or {}).get("name") for job in jobs}]  # fmt: skip
    names = [str((obj.get("metadata") or {}).get("name")) for obj in (*jobs, *pods)]
    events = [event for name in names for event in ctx.events(regarding=name)]
    # Pods gone since (a preempted or evicted one, released once its run settled):
    # their Events outlive them.
    for gone in sorted(pods_named(events) - set(names)):
        events.extend(ctx.events(regarding=gone))
    story = tell(jobs=jobs, pods=pods, events=events, labels=ctx.labels, now=time.time())
    which = f"{instrument} run {args.run}" + (
        f" v{args.version}" if args.version is not None else "")
    ctx.emit(format_story(story, run=which), {"run": which, **story_json(story)})
    return EXIT_OK if story.versions else EXIT_RUN_FAILED

"""``autoreduce``: the operator's command line.

    autoreduce status [--watch [SECONDS]]       runs waiting, running, recently finished
    autoreduce explain INSTRUMENT RUN [--version V]   one run's story, in time order
    autoreduce submit DATA SCRIPT --rb N        a manual run (priority 1, started_by -1)
    autoreduce cancel --instrument I --rb N --run R [--version V]
    autoreduce retry JOB | --instrument I --run R --version V    (alias: rerun)
    autoreduce render MESSAGE.json [--dry-run-server]
    autoreduce dead-letters list | show ID | requeue ID...
    autoreduce broker-grants                     the broker admin's authorizationEntries

The parser: every command, its options, and the function that runs it (``func``).
The first paragraph above is the description ``autoreduce --help`` prints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from autoreduce_common.broker_grants import DISPATCHER_GROUP, RUNNER_GROUP

from autoreduce_cli.cmd_broker_grants import cmd_broker_grants
from autoreduce_cli.cmd_cancel import cmd_cancel
from autoreduce_cli.cmd_dead_letters import cmd_dlq_list, cmd_dlq_requeue, cmd_dlq_show
from autoreduce_cli.cmd_explain import cmd_explain
from autoreduce_cli.cmd_render import cmd_render
from autoreduce_cli.cmd_retry import cmd_retry
from autoreduce_cli.cmd_status import cmd_status
from autoreduce_cli.cmd_submit import cmd_submit


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("AUTOREDUCE_CONFIG_FILE"),
        help="the dispatcher's settings file (AUTOREDUCE_* variables override it)",
    )
    common.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    common.add_argument("-n", "--namespace", help="namespace (default: settings jobs.namespace)")
    common.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return common


def _run_id(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--instrument", required=required)
    parser.add_argument("--run", type=int, required=required)
    parser.add_argument("--version", type=int, default=0)
    parser.add_argument("--facility", default="ISIS")


def _follow_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait", dest="wait", action="store_false", help="send and return at once"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the run")


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(
        prog="autoreduce",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", parents=[common], help="runs waiting, running, recently finished")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS")
    p.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes")
    p.add_argument("--recent", type=int, default=10, help="finished runs shown")
    p.add_argument("--instrument")
    p.add_argument("--rb")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("explain", parents=[common],
                       help="one run's story: arrival, waits, scheduling, containers, outcome")
    p.add_argument("instrument")
    p.add_argument("run", type=int)
    p.add_argument("--version", type=int, help="one version only (default: every version)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("submit", parents=[common], help="submit a run by hand (priority 1)")
    p.add_argument("data", help="raw data file path as the reduction pods see it")
    p.add_argument("script", help="local path of the reduce.py to send")
    p.add_argument("--rb", required=True, help="RB (experiment) number")
    p.add_argument("--instrument", help="default: from the data file name")
    p.add_argument("--run", type=int, help="default: from the data file name")
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--facility", default="ISIS")
    p.add_argument("--arguments", help="reduction_arguments as JSON, or @file")
    p.add_argument("--description")
    _follow_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("cancel", parents=[common], help="cancel a waiting or running run")
    _run_id(p, required=True)
    p.add_argument("--rb", required=True)
    p.set_defaults(func=cmd_cancel)

    for name in ("retry", "rerun"):
        p = sub.add_parser(name, parents=[common], help="resubmit a run as the next version")
        p.add_argument("job", nargs="?", help="the Job name (or give --instrument/--run/--version)")
        _run_id(p, required=False)
        p.add_argument("--description")
        _follow_args(p)
        p.set_defaults(func=cmd_retry)

    p = sub.add_parser("render", parents=[common], help="print the Job a message would make")
    p.add_argument("message", help="a run message (JSON file)")
    p.add_argument("--priority", type=int, default=4)
    p.add_argument("--dry-run-server", action="store_true", help="validate it with the API")
    p.set_defaults(func=cmd_render)

    _broker_commands(sub, common)
    return top


def _broker_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The commands about the broker itself: its dead letters, and its grants."""
    p = sub.add_parser("dead-letters", help="the dead-letter queue")
    dlq = p.add_subparsers(dest="action", required=True)
    q = dlq.add_parser("list", parents=[common], help="browse (nothing is consumed)")
    q.set_defaults(func=cmd_dlq_list)
    q = dlq.add_parser("show", parents=[common], help="one message: reason, headers, body")
    q.add_argument("id")
    q.set_defaults(func=cmd_dlq_show)
    q = dlq.add_parser("requeue", parents=[common], help="move messages back to pending")
    q.add_argument("ids", nargs="*")
    q.add_argument("--all", action="store_true")
    q.set_defaults(func=cmd_dlq_requeue)

    p = sub.add_parser("broker-grants", parents=[common],
                       help="the ActiveMQ authorizationEntries the broker admin adds")
    p.add_argument("--dispatcher-group", default=DISPATCHER_GROUP,
                   help="the broker group of the dispatcher's user")
    p.add_argument("--runner-group", default=RUNNER_GROUP,
                   help="the broker group of the runners' user")
    p.set_defaults(func=cmd_broker_grants)

"""``autoreduce broker-grants``: the ActiveMQ authorizationEntries for these settings.

For the facility's broker admin: the entries that give the dispatcher's and the
runners' broker users what they need and no more, on the queue names the settings
use (autoreduce_common/broker_grants.py; README "Broker security").
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from autoreduce_common.broker_grants import authorization_entries, grants

from autoreduce_cli.errors import EXIT_OK

if TYPE_CHECKING:
    from autoreduce_cli.cli import Context


def cmd_broker_grants(ctx: Context, args: argparse.Namespace) -> int:
    entries = grants(ctx.settings.broker.queues, dispatcher=args.dispatcher_group,
                     runner=args.runner_group)
    ctx.emit(authorization_entries(entries) + "\n", [dataclasses.asdict(e) for e in entries])
    return EXIT_OK

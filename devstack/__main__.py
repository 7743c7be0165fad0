"""``python -m devstack up [--workdir DIR] [--keep-files]``: the local stack (broker,
control plane, the product's images, a real node) until Ctrl-C or SIGTERM, which
stop everything it started and remove its folder (``--keep-files`` keeps it)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from devstack.errors import StackStartError
from devstack.stack import main_up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the stack and wait for Ctrl-C or SIGTERM")
    up.add_argument("--workdir", type=Path, help="default: a new folder in the temp folder")
    up.add_argument("--keep-files", action="store_true", help="keep the folder after a stop")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autoreduce-stack-"))
    try:
        return main_up(workdir.resolve(), keep_files=args.keep_files)
    except StackStartError as error:
        print(f"devstack: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m autoreduce_cli``: the ``autoreduce`` command."""

from __future__ import annotations

import sys

from autoreduce_cli.cli import main

if __name__ == "__main__":
    sys.exit(main())

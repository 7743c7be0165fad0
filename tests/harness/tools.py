"""Where the suite finds its command-line tools (helm, built by scripts/bootstrap.sh)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devstack.paths import bin_dir


def helm_binary() -> str:
    """helm: $AUTOREDUCE_HELM, then PATH, then the bootstrap's cache. Never a skip."""
    for candidate in (
        os.environ.get("AUTOREDUCE_HELM"),
        shutil.which("helm"),
        str(bin_dir() / "helm"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("no helm binary: run scripts/bootstrap.sh or set AUTOREDUCE_HELM")

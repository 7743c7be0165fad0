"""Where the stack finds its binaries and keeps what outlives one run."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built binaries and the base-image tarball: slow to make, safe to share."""
    return Path(os.environ.get("AUTOREDUCE_CACHE", str(Path.home() / ".cache" / "autoreduce")))


def bin_dir() -> Path:
    """What scripts/bootstrap.sh builds from hack/controlplane (same variable as it)."""
    return Path(os.environ.get("AUTOREDUCE_BIN", str(cache_dir() / "bin")))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]

"""Was the script's process killed for memory? Asked of the container's memory cgroup.

When a container goes over its memory limit the kernel OOM-kills a process in it. On
cgroup v1 (and on v2 without ``memory.oom.group``) that is only the largest process,
the script's child: the runner survives, sees its child die by SIGKILL and must tell
the user "out of memory" instead of "killed by SIGKILL". The cgroup counts its OOM
kills (``oom_kill N``), so the runner samples the count before it starts the child
and compares after: an OOM kill from an earlier moment never relabels this run, and
a SIGKILL with no new OOM kill (or with nothing readable) stays a plain signal.

Where to read, as seen from inside a container:

- cgroup v2: ``<root>/memory.events`` and ``<root>/memory.max`` (``max`` = no limit);
- cgroup v1: ``<root>/memory/memory.oom_control`` (``oom_kill`` since Linux 4.13) and
  ``<root>/memory/memory.limit_in_bytes`` (about 2**63 = no limit).

Parsing and the verdict are pure; ``read_sample`` is the only I/O.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from autoreduce_common.pod_contract import UNKNOWN_LIMIT, out_of_memory_message, render_memory

# (events file, limit file) under the cgroup root, the unified hierarchy first.
CGROUP_FILES = (
    ("memory.events", "memory.max"),
    ("memory/memory.oom_control", "memory/memory.limit_in_bytes"),
)
# cgroup v1 shows "no limit" as the largest page-aligned signed 64-bit number.
_NO_LIMIT_FROM = 1 << 62


@dataclass(frozen=True)
class MemorySample:
    """What the memory cgroup said at one moment (None: it could not be read)."""

    oom_kills: int | None = None
    limit_bytes: int | None = None  # None also when the cgroup has no limit


def parse_sample(*, events: str | None, limit: str | None) -> MemorySample:
    """A sample from the texts of the events file and the limit file."""
    return MemorySample(oom_kills=_oom_kills(events), limit_bytes=_limit(limit))


def _oom_kills(events: str | None) -> int | None:
    for line in (events or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def _limit(text: str | None) -> int | None:
    value = (text or "").strip()
    if not value.isdigit() or int(value) >= _NO_LIMIT_FROM:
        return None  # "max", unreadable, or v1's "unlimited"
    return int(value)


def oom_verdict(*, returncode: int, before: MemorySample, after: MemorySample) -> str | None:
    """The ReductionError text when the child died by SIGKILL and the cgroup counted an
    OOM kill while it ran; None when that cannot be said."""
    if returncode != -signal.SIGKILL:
        return None
    if before.oom_kills is None or after.oom_kills is None:
        return None
    if after.oom_kills <= before.oom_kills:
        return None
    limit = after.limit_bytes if after.limit_bytes is not None else before.limit_bytes
    return out_of_memory_message(
        limit=render_memory(limit) if limit is not None else UNKNOWN_LIMIT
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def read_sample(*, root: Path) -> MemorySample:
    """The container's memory cgroup now (an empty sample when none is readable)."""
    for events_name, limit_name in CGROUP_FILES:
        events = _read(root / events_name)
        if events is not None:
            return parse_sample(events=events, limit=_read(root / limit_name))
    return MemorySample()

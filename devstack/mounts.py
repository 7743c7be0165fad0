"""Mounts the stack's processes leave behind when they are stopped or killed."""

from __future__ import annotations

import ctypes
from pathlib import Path

_MNT_DETACH = 2


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (octal escapes in mountinfo decoded)."""
    root = str(directory.resolve()).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4].encode().decode("unicode_escape")
        if mountpoint == root or mountpoint.startswith(root + "/"):
            found.append(mountpoint)
    return found


def unmount_all(directory: Path) -> None:
    """Deepest first, detached (a process killed mid-way leaves busy mounts)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for _ in range(5):
        found = mounts_under(directory)
        if not found:
            return
        for mountpoint in sorted(found, key=len, reverse=True):
            libc.umount2(mountpoint.encode(), _MNT_DETACH)

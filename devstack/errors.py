"""The one error a stack raises when something it starts does not come up."""

from __future__ import annotations

from pathlib import Path


class StackStartError(RuntimeError):
    """A component did not come up; the message names it, says why, and shows its log."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def failed(component: str, why: str, log: Path) -> StackStartError:
    return StackStartError(f"{component} {why}; log {log}:\n{log_tail(log)}")

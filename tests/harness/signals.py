"""How the suite starts a process it will stop with a terminal's Ctrl-C."""

from __future__ import annotations

import signal


def as_a_background_job() -> None:
    """A Popen preexec hook: the child starts with SIGINT ignored, as every command a
    shell without job control starts with ``&`` does (CI scripts, ``nohup``-style
    launches). A Ctrl-C must stop the stack even then; the product sets its own
    handler rather than trust what it inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

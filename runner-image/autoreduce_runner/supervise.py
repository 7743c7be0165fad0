"""Parent side: run the child in its own process group, capture its fds, enforce
the timeout.

The child's fd 1 and 2 are one pipe, so everything written to them (print, C
extensions, subprocesses that inherit them) arrives here in order. Each chunk is
teed live to the admin's stdout (``kubectl logs``), to the run's log file and to a
bounded in-memory capture for ``reduction_log``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from autoreduce_common.messages import bound_text

_READ_CHUNK = 65_536
_POLL_S = 0.2
# After the child exits, how long to keep reading output from stray processes that
# inherited the pipe before the whole group is killed.
_DRAIN_AFTER_EXIT_S = 1.0


class BoundedCapture:
    """Keeps the first and last ``limit`` bytes of a stream, and how much was cut."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            if len(self._tail) > self._limit:
                del self._tail[: len(self._tail) - self._limit]

    def text(self, *, limit_chars: int) -> str:
        head = self._head.decode("utf-8", errors="replace")
        cut = self.total - len(self._head) - len(self._tail)
        if cut <= 0:
            return bound_text(head + self._tail.decode("utf-8", errors="replace"),
                              limit=limit_chars)
        tail = self._tail.decode("utf-8", errors="replace")
        return bound_text(f"{head}\n... [{cut} bytes cut] ...\n{tail}", limit=limit_chars)


@dataclass(frozen=True)
class Supervised:
    """How the child ended."""

    returncode: int
    timed_out: bool
    stopped: bool  # the admin was told to stop (SIGTERM) and killed the child
    duration_s: float


class _Sinks:
    def __init__(self, *, tee: BinaryIO | None, log_file: BinaryIO | None,
                 capture: BoundedCapture) -> None:
        self._targets = [t for t in (tee, log_file) if t is not None]
        self._capture = capture

    def write(self, chunk: bytes) -> None:
        self._capture.add(chunk)
        for target in list(self._targets):
            try:
                target.write(chunk)
                target.flush()
            except (OSError, ValueError):
                self._targets.remove(target)  # a closed stdout must not stop the run


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Killer:
    """SIGTERM to the group, then SIGKILL after the grace period."""

    def __init__(self, *, pgid: int, grace_s: float) -> None:
        self._pgid = pgid
        self._grace_s = grace_s
        self._term_at: float | None = None

    def tick(self, now: float) -> None:
        if self._term_at is None:
            self._term_at = now
            _signal_group(self._pgid, signal.SIGTERM)
        if now - self._term_at >= self._grace_s:
            _signal_group(self._pgid, signal.SIGKILL)


def supervise(
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    timeout_s: float,
    kill_grace_s: float,
    tee: BinaryIO | None,
    log_file: BinaryIO | None,
    capture: BoundedCapture,
    stop: threading.Event,
) -> Supervised:
    """Run ``argv`` to the end (or its timeout, or ``stop``) and capture its output."""
    started = time.monotonic()
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            cwd=cwd, env=dict(env), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(write_fd)
    sinks = _Sinks(tee=tee, log_file=log_file, capture=capture)
    try:
        timed_out, stopped = _pump(
            proc=proc, read_fd=read_fd, sinks=sinks, deadline=started + timeout_s,
            killer=_Killer(pgid=proc.pid, grace_s=kill_grace_s), stop=stop,
        )
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # strays the script left behind
        proc.wait()
        os.close(read_fd)
    return Supervised(returncode=proc.returncode, timed_out=timed_out, stopped=stopped,
                      duration_s=time.monotonic() - started)


def _pump(*, proc: subprocess.Popen[bytes], read_fd: int, sinks: _Sinks, deadline: float,
          killer: _Killer, stop: threading.Event) -> tuple[bool, bool]:
    timed_out = stopped = eof = False
    exited_at: float | None = None
    while True:
        if not eof and select.select([read_fd], [], [], _POLL_S)[0]:
            chunk = os.read(read_fd, _READ_CHUNK)
            eof = not chunk
            if chunk:
                sinks.write(chunk)
        elif eof:
            time.sleep(_POLL_S)
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and (eof or now - exited_at > _DRAIN_AFTER_EXIT_S):
            return timed_out, stopped
        if exited_at is None and now >= deadline:
            timed_out = True
        if exited_at is None and stop.is_set() and not timed_out:
            stopped = True
        if timed_out or stopped:
            killer.tick(now)

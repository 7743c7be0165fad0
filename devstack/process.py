"""One long-running process of the stack: its own process group and log file, a
health check, a graceful stop that ends in SIGKILL, and a parent-death signal so a
crashed caller does not leave it behind."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.errors import failed

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec hook: the child gets ``sig`` when the thread that started it dies
    (it survives exec, so it also covers what nsenter execs)."""

    def hook() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)

    return hook


def always() -> bool:
    return True


@dataclass
class Process:
    """Start from a thread that outlives the process (the main thread): the
    parent-death signal fires when the *thread* that started it exits."""

    name: str
    argv: list[str]
    log_path: Path
    healthy: Callable[[], bool] = always
    env: Mapping[str, str] | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 20.0
    parent_death_signal: int = signal.SIGKILL
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, timeout: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=None if self.env is None else dict(self.env),
                preexec_fn=die_with_parent(self.parent_death_signal),  # noqa: PLW1509
            )  # fmt: skip
        self.wait_healthy(timeout=timeout)

    def wait_healthy(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                code = self.popen.returncode
                raise failed(self.name, f"exited with code {code} while starting", self.log_path)
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise failed(self.name, f"did not become healthy within {timeout:.0f}s", self.log_path)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def stop(self, *, sig: int | None = None, timeout: float | None = None) -> None:
        """``sig`` first (default: the graceful one), SIGKILL after ``timeout``."""
        timeout = self.stop_timeout if timeout is None else timeout
        proc, self.popen = self.popen, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig or self.stop_signal)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(10)

    def kill(self) -> None:
        """As a power cut would: no chance to clean up."""
        self.stop(sig=signal.SIGKILL, timeout=10)


def run(argv: list[str], *, what: str, input_bytes: bytes | None = None,
        timeout: float = 600) -> str:  # fmt: skip
    """A short command that must succeed; the error says what it was for and why."""
    proc = subprocess.run(argv, input=input_bytes, capture_output=True, timeout=timeout,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
        raise RuntimeError(f"{what} failed ({' '.join(argv[:3])} ...: exit {proc.returncode}): "
                           f"{err[-2000:]}")  # fmt: skip
    return proc.stdout.decode(errors="replace")

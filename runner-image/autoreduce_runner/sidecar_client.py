"""The runner's side of the poster sidecar: a ``Poster`` that posts through it.

``connect`` opens the one session the sidecar gives, before the script starts, and
the runner keeps it for the whole run: the script cannot open another (the sidecar
removed its socket), does not inherit this one (``close_fds``), and cannot take it
from the runner's process, which is made non-dumpable (no ptrace, no
``/proc/<pid>/fd`` or ``mem`` for a process of the same user).
"""

from __future__ import annotations

import ctypes
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autoreduce_common.stomp_client import BrokerError, BrokerRefusedError, BrokerTlsError

from autoreduce_runner.sidecar_protocol import (
    FailureKind,
    PostRequest,
    decode_reply,
    encode_request,
)

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4


def make_non_dumpable() -> None:
    """Keep processes of our own user (the script) out of this one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_DUMPABLE) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as problem:  # not Linux
        log.warning("cannot make the runner non-dumpable: %s", problem)


class SidecarPoster:
    """Posts through the sidecar at ``path``; the same calls as ``Poster``."""

    def __init__(self, *, path: Path, connect_timeout_s: float, reply_timeout_s: float) -> None:
        self._path = path
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._sock: socket.socket | None = None
        self._replies: Any = None

    def connect(self) -> None:
        """Open the session, waiting for the sidecar to listen (it starts first, but
        may still be starting); BrokerError when it never does."""
        if self._sock is not None:
            return
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._path))
            except OSError as error:
                sock.close()
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"the poster sidecar does not answer on {self._path}: {error}"
                    ) from error
                time.sleep(0.2)
                continue
            sock.settimeout(self._reply_timeout_s)
            self._sock, self._replies = sock, sock.makefile("rb")
            log.info("session opened with the poster sidecar")
            return

    def post(self, *, destination: str, message: dict[str, Any],
             headers: dict[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None:
        """Ask the sidecar to post; return once the broker confirmed it. The sidecar
        resends once itself when a receipt is lost, as ``Poster`` does."""
        self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(encode_request(PostRequest(destination, message,
                                                          dict(headers or {}))))
            if on_sent is not None:
                on_sent()
            line = self._replies.readline()
        except OSError as error:
            raise BrokerError(f"the poster sidecar's session broke: {error}") from error
        if not line:
            raise BrokerError("the poster sidecar ended the session")
        try:
            reply = decode_reply(line)
        except ValueError as error:
            raise BrokerError(f"the poster sidecar answered junk: {error}") from error
        if reply.ok:
            return
        raise {
            FailureKind.REFUSED: BrokerRefusedError,
            FailureKind.TLS: BrokerTlsError,
        }.get(reply.kind, BrokerError)(f"the poster sidecar: {reply.error}")

    def close(self) -> None:
        """Nothing: the sidecar gives one session, so it lasts as long as the runner
        (its socket closes with the process)."""

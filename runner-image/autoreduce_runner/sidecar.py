"""``python -m autoreduce_runner.sidecar``: the reduction pod's poster.

A native sidecar (an init container with ``restartPolicy: Always``) and the only
container of the pod that mounts the broker credential, so ``reduce.py``, which runs
in the runner container, has no password to read. The runner opens a session on the
sidecar's Unix socket before it starts the script; the sidecar then removes the
socket, so nobody else (the script included) can open another. It posts what the
runner asks, to the four outcome queues only, each message on a connection of its
own (``Poster``), and answers once the broker has confirmed it.

A sidecar that restarts after it gave its session away (it crashed or was killed)
finds its marker in its own emptyDir and opens no new session: a script that outlived
the runner's session must not be able to claim one. The runner's next post then fails,
and the dispatcher posts the run's outcome from the runner's termination report, as
it does for any runner that could not reach the broker.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from autoreduce_common.stomp_client import BrokerError, BrokerRefusedError, BrokerTlsError

from autoreduce_runner.broker import OutcomePoster, Poster
from autoreduce_runner.config import ConfigError, RunnerSettings, load_settings
from autoreduce_runner.sidecar_protocol import (
    FailureKind,
    PostReply,
    PostRequest,
    decode_request,
    encode_reply,
)

log = logging.getLogger("autoreduce_runner.sidecar")

CLAIMED_MARKER = "session-claimed"
_ACCEPT_POLL_S = 0.5


def answer(request: PostRequest, *, poster: OutcomePoster,
           allowed: frozenset[str]) -> PostReply:
    """Post one request, and what to tell the runner about it."""
    if request.destination not in allowed:
        return PostReply(False, f"{request.destination} is not an outcome queue",
                         FailureKind.REQUEST)
    try:
        poster.post(destination=request.destination, message=request.message,
                    headers=request.headers)
    except BrokerRefusedError as error:
        return PostReply(False, str(error), FailureKind.REFUSED)
    except BrokerTlsError as error:
        return PostReply(False, str(error), FailureKind.TLS)
    except BrokerError as error:
        return PostReply(False, str(error), FailureKind.BROKER)
    return PostReply(True)


def _accept_one(path: Path, stop: threading.Event) -> socket.socket | None:
    """Listen on ``path`` until the first connection, then remove the socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(_ACCEPT_POLL_S)
        log.info("waiting for the runner on %s", path)
        while not stop.is_set():
            try:
                session, _ = listener.accept()
            except TimeoutError:
                continue
            session.settimeout(None)
            return session
        return None
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def serve(settings: RunnerSettings, stop: threading.Event, *,
          poster: OutcomePoster | None = None) -> int:
    """Give one session, post what it asks, then wait for ``stop`` (SIGTERM).
    ``poster``: how to post (the real ``Poster`` by default)."""
    assert settings.poster_socket is not None
    marker = settings.poster_state_dir / CLAIMED_MARKER
    if marker.exists():
        log.error("restarted after the runner's session was opened: opening no other "
                  "(the dispatcher reports this run if the runner cannot post)")
        stop.wait()
        return 0
    poster = poster or Poster(settings=settings.broker,
                              connect_timeout_s=settings.broker_connect_timeout_s)
    warm_up = _warm_up(poster)
    session = _accept_one(settings.poster_socket, stop)
    if session is None:
        poster.close()
        return 0
    settings.poster_state_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("claimed\n")
    log.info("session opened; the socket is gone, so no other can be")
    allowed = frozenset(settings.broker.queues.outcome_queues())
    warm_up.join()  # the first post must not race the warm-up's connect
    try:
        _serve_session(session, poster=poster, allowed=allowed)
    except OSError as problem:  # the runner went away mid-answer: nothing to tell it
        log.warning("the runner's session broke: %s", problem)
    log.info("the runner closed its session")
    # Exiting would only make the kubelet start this container again; it stops us.
    stop.wait()
    return 0


def _warm_up(poster: OutcomePoster) -> threading.Thread:
    """Connect to the broker while the runner starts, so its first post (Started) costs
    a SEND and its receipt, not a connect and a login too. That connection carries
    only Started: every post closes its connection after, as before."""

    def connect() -> None:
        try:
            poster.connect()
        except BrokerError as error:  # the first post connects (and says why) again
            log.warning("broker not reached before the runner's first post: %s", error)

    thread = threading.Thread(target=connect, name="broker-warm-up", daemon=True)
    thread.start()
    return thread


def _serve_session(session: socket.socket, *, poster: OutcomePoster,
                   allowed: frozenset[str]) -> None:
    with session, session.makefile("rb") as lines:
        for line in lines:
            try:
                request = decode_request(line)
            except ValueError as problem:
                reply = PostReply(False, f"bad request: {problem}", FailureKind.REQUEST)
            else:
                reply = answer(request, poster=poster, allowed=allowed)
                log.info("%s to %s: %s", "posted" if reply.ok else "not posted",
                         request.destination, reply.error or "confirmed by the broker")
            # The answer first, as a runner posting itself records "posted" before it
            # closes: the close can take a while, the runner need not wait for it.
            session.sendall(encode_reply(reply))
            poster.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        settings = load_settings()
    except ConfigError as problem:
        log.error("bad poster configuration: %s", problem)
        return 2
    if settings.poster_socket is None:
        log.error("bad poster configuration: AUTOREDUCE_POSTER_SOCKET is not set")
        return 2
    return serve(settings, stop)


if __name__ == "__main__":
    sys.exit(main())

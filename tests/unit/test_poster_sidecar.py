"""The poster sidecar and the runner's side of it, on a real Unix socket (the broker
is our own boundary's fake here; tests/integration runs the real thing in pods)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import BrokerError, BrokerRefusedError
from autoreduce_runner.broker import close_within
from autoreduce_runner.config import RunnerSettings
from autoreduce_runner.sidecar import CLAIMED_MARKER, serve
from autoreduce_runner.sidecar_client import SidecarPoster
from autoreduce_runner.sidecar_protocol import (
    FailureKind,
    PostReply,
    PostRequest,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

QUEUES = BrokerSettings().queues


class FakePoster:
    """Our own Poster's calls, recorded; ``refuse`` makes the broker say no."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.refuse = False
        self.connects = 0
        self.unreachable = False

    def connect(self) -> None:
        self.connects += 1
        if self.unreachable:
            raise BrokerError("no broker at broker:61613")

    def post(self, *, destination: str, message: dict[str, Any],
             headers: dict[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None:
        if self.refuse:
            raise BrokerRefusedError("User x is not authorized to write to: queue://Q")
        self.posted.append((destination, message, dict(headers or {})))

    def close(self) -> None:
        pass


@pytest.fixture
def settings(tmp_path: Path) -> RunnerSettings:
    # A short folder: a Unix socket's path may not be longer than about 100 bytes.
    return RunnerSettings(poster_socket=tmp_path / "p.sock", poster_state_dir=tmp_path / "st")


@pytest.fixture
def sidecar(settings: RunnerSettings) -> Iterator[tuple[FakePoster, threading.Event]]:
    poster, stop = FakePoster(), threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop), kwargs={"poster": poster},
                              daemon=True)
    thread.start()
    yield poster, stop
    stop.set()
    thread.join(5)


def client(settings: RunnerSettings, timeout: float = 5.0) -> SidecarPoster:
    assert settings.poster_socket is not None
    return SidecarPoster(path=settings.poster_socket, connect_timeout_s=timeout,
                         reply_timeout_s=5)


def test_requests_and_replies_round_trip_and_junk_is_refused() -> None:
    request = PostRequest("/queue/A", {"run_number": 1, "ü": "x"}, {"h": "v"})
    assert decode_request(encode_request(request)) == request
    reply = PostReply(False, "why", FailureKind.REFUSED)
    assert decode_reply(encode_reply(reply)) == reply
    assert decode_reply(encode_reply(PostReply(True))).ok
    for junk in (b"", b"[]", b'{"destination": 1, "message": {}}', b"\xff",
                 b'{"destination": "q", "message": {}, "headers": {"a": 1}}'):
        with pytest.raises(ValueError):
            decode_request(junk)


def test_one_session_only_and_only_the_outcome_queues(
    settings: RunnerSettings, sidecar: tuple[FakePoster, threading.Event],
) -> None:
    poster, _ = sidecar
    runner = client(settings)
    runner.connect()
    sent: list[bool] = []
    runner.post(destination=QUEUES.started, message={"run_number": 1},
                headers={"autoreduce-outcome-id": "job-1"}, on_sent=lambda: sent.append(True))
    assert poster.posted == [(QUEUES.started, {"run_number": 1},
                              {"autoreduce-outcome-id": "job-1"})]
    assert sent == [True]
    # Anything but the four outcome queues is refused by the sidecar itself.
    for queue in (QUEUES.pending, QUEUES.dead_letter, "/queue/Elsewhere"):
        with pytest.raises(BrokerError, match="not an outcome queue"):
            runner.post(destination=queue, message={})
    assert len(poster.posted) == 1
    # The socket is gone: a second client (the script) cannot open a session.
    assert settings.poster_socket is not None and not settings.poster_socket.exists()
    with pytest.raises(BrokerError, match="does not answer"):
        client(settings, timeout=0.5).connect()
    runner.post(destination=QUEUES.complete, message={"run_number": 1})
    assert [d for d, _, _ in poster.posted] == [QUEUES.started, QUEUES.complete]


def test_the_brokers_refusal_reaches_the_runner_as_a_refusal(
    settings: RunnerSettings, sidecar: tuple[FakePoster, threading.Event],
) -> None:
    poster, _ = sidecar
    poster.refuse = True
    with pytest.raises(BrokerRefusedError, match="not authorized"):
        client(settings).post(destination=QUEUES.error, message={})


def test_a_restarted_sidecar_opens_no_second_session(settings: RunnerSettings) -> None:
    settings.poster_state_dir.mkdir(parents=True)
    (settings.poster_state_dir / CLAIMED_MARKER).write_text("claimed\n")
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop),
                              kwargs={"poster": FakePoster()}, daemon=True)
    thread.start()
    try:
        with pytest.raises(BrokerError, match="does not answer"):
            client(settings, timeout=1.0).connect()
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_session_the_sidecar_ended_is_a_broker_error_not_a_hang(
    settings: RunnerSettings, sidecar: tuple[FakePoster, threading.Event],
) -> None:
    runner = client(settings)
    runner.connect()
    assert runner._sock is not None
    runner._sock.shutdown(1)  # as if the sidecar had gone: no reply will come
    with pytest.raises(BrokerError):
        runner.post(destination=QUEUES.complete, message={})


def test_a_close_that_hangs_is_left_behind() -> None:
    """The outcome is confirmed before the close; a broker teardown that never ends
    must not hold the runner or the sidecar (and so the pod and its RB) for ever."""
    release = threading.Event()
    started = time.monotonic()
    assert close_within(lambda: release.wait(30) and None, timeout_s=0.3) is False
    assert time.monotonic() - started < 5
    release.set()
    assert close_within(lambda: None, timeout_s=5) is True


def test_the_broker_connection_is_opened_before_the_runner_asks(
    settings: RunnerSettings, sidecar: tuple[FakePoster, threading.Event],
) -> None:
    """The runner's Started then costs a SEND and its receipt, not a login as well."""
    poster, _ = sidecar
    deadline = time.monotonic() + 5
    while poster.connects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert poster.connects == 1  # no runner has opened a session yet


def test_a_broker_not_reached_at_start_up_does_not_stop_the_first_post(
    settings: RunnerSettings,
) -> None:
    poster, stop = FakePoster(), threading.Event()
    poster.unreachable = True
    thread = threading.Thread(target=serve, args=(settings, stop), kwargs={"poster": poster},
                              daemon=True)
    thread.start()
    try:
        runner = client(settings)
        runner.connect()
        runner.post(destination=QUEUES.started, message={"run_number": 7})
        assert [m for _, m, _ in poster.posted] == [{"run_number": 7}]
        runner.close()
    finally:
        stop.set()
        thread.join(5)

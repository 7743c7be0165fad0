"""Two broker identities, least privilege, enforced by the broker (issue 19, item 2).

The suite's ActiveMQ runs the ``authorizationPlugin`` with the grants the README
gives a facility's broker admin (autoreduce_common/broker_grants.py makes both). The
refusals are the broker's own: ERROR frames read off a bare socket, with no client
library between, and then the same refusals as our client reports them. Every other
test of the suite runs the dispatcher and every runner pod as their own identities,
so the grants are also shown to be enough.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import BrokerRefusedError, StompClient
from pydantic import SecretStr

from devstack.activemq import ActiveMQ, free_port
from devstack.product import DispatcherProcess, wait_until
from tests.conftest import needs_own_component
from tests.harness.checks import http_status
from tests.harness.stomp_frames import Frame, RawStomp

pytestmark = pytest.mark.integration


@pytest.fixture
def as_user(broker: Any, broker_settings: BrokerSettings) -> Iterator[Callable[..., RawStomp]]:
    """Raw STOMP sessions on the suite's own broker as one of its identities."""
    if not isinstance(broker, ActiveMQ):
        needs_own_component("the authorization tests need the suite's own broker and its grants")
    opened: list[RawStomp] = []

    def open_as(identity: Any) -> RawStomp:
        address, port = broker_settings.host_and_ports()[0]
        session = RawStomp(address, port, user=identity.user, password=identity.password,
                           ca_file=broker_settings.tls.ca_file)
        assert session.connected.command == "CONNECTED", session.connected
        opened.append(session)
        return session

    yield open_as
    for session in opened:
        session.close()


def refused(frame: Frame, *, user: str, right: str, destination: str) -> bool:
    """An ERROR frame in which the broker says ``user`` may not ``right`` the queue."""
    name = destination.removeprefix("/queue/")
    return frame.command == "ERROR" and (
        f"User {user} is not authorized to {right}: queue://{name}" in frame.body)


def send(session: RawStomp, destination: str) -> Frame:
    return session.request("SEND", {"destination": destination, "persistent": "true"},
                           '{"x": 1}')


def subscribe(session: RawStomp, destination: str, **headers: str) -> Frame:
    return session.request("SUBSCRIBE", {"destination": destination, "id": uuid.uuid4().hex,
                                         "ack": "client", **headers})


def test_the_runner_identity_may_only_send_the_four_outcomes(
    as_user: Callable[..., RawStomp], broker: ActiveMQ, broker_settings: BrokerSettings,
) -> None:
    q = broker_settings.queues
    runner = as_user(broker.runner)
    user = broker.runner.user
    for outcome in (q.started, q.complete, q.error, q.skipped):
        assert send(runner, outcome).command == "RECEIPT"
        for how in ({}, {"browser": "true"}):  # consume, or only look
            frame = subscribe(runner, outcome, **how)
            assert refused(frame, user=user, right="read from", destination=outcome), frame
    # Taking other experiments' runs, injecting runs, touching the dead letters.
    for name in (q.pending, q.dead_letter):
        frame = subscribe(runner, name)
        assert refused(frame, user=user, right="read from", destination=name), frame
        frame = send(runner, name)
        assert refused(frame, user=user, right="write to", destination=name), frame
    # Any other queue, too: nothing is granted but the outcomes.
    other = f"{q.pending}.elsewhere"
    assert refused(send(runner, other), user=user, right="write to", destination=other)


def test_the_dispatcher_identity_has_what_the_dispatcher_and_cli_use_and_no_more(
    as_user: Callable[..., RawStomp], broker: ActiveMQ, broker_settings: BrokerSettings,
) -> None:
    q = broker_settings.queues
    dispatcher = as_user(broker.dispatcher)
    # Consumes and (retries, the CLI's requeue and cancel) sends runs; dead-letters;
    # posts outcomes on a runner's behalf; the CLI browses outcomes and dead letters.
    for name in (q.pending, q.dead_letter, q.started, q.complete, q.error, q.skipped):
        assert send(dispatcher, name).command == "RECEIPT", name
        assert subscribe(dispatcher, name, browser="true").command == "RECEIPT", name
    assert subscribe(dispatcher, q.pending).command == "RECEIPT"
    other = "/queue/SomeoneElses.Queue"
    frame = send(dispatcher, other)
    assert refused(frame, user=broker.dispatcher.user, right="write to", destination=other), frame


def test_our_client_reports_the_brokers_refusal_with_its_reason(
    broker: Any, broker_settings: BrokerSettings,
) -> None:
    """A refused SEND or SUBSCRIBE is a BrokerRefusedError carrying the broker's words,
    never a silent consumer that receives nothing; a refused SEND leaves the connection
    up, a refused SUBSCRIBE takes it down until the subscription is allowed or dropped."""
    if not isinstance(broker, ActiveMQ):
        needs_own_component("the authorization tests need the suite's own broker and its grants")
    settings = broker.settings_for(broker.runner, broker_settings)
    client = StompClient(settings=settings, client_name="authz-test")
    client.connect()
    try:
        with pytest.raises(BrokerRefusedError, match="not authorized to write to"):
            client.send(destination=settings.queues.pending, body=b"{}")
        client.send(destination=settings.queues.complete, body=b"{}")  # still connected
        sink: queue.Queue[Any] = queue.Queue()
        with pytest.raises(BrokerRefusedError, match="not authorized to read from"):
            client.subscribe(destination=settings.queues.pending, sink=sink)
        # No connection stays up without its subscription: every reconnect asks again.
        assert not client.connected
        with pytest.raises(BrokerRefusedError, match="not authorized to read from"):
            client.connect()
        client.unsubscribe(sink)
        client.connect()
        client.send(destination=settings.queues.complete, body=b"{}")
    finally:
        client.disconnect()


def test_a_wrong_password_is_a_refused_login_that_says_so(
    broker: Any, broker_settings: BrokerSettings,
) -> None:
    """Not "no broker reachable": the broker answered, and said why."""
    if not isinstance(broker, ActiveMQ):
        needs_own_component("the authorization tests need the suite's own broker and its grants")
    wrong = broker_settings.model_copy(update={"username": broker.runner.user,
                                               "password": SecretStr("not-the-password")})
    with pytest.raises(BrokerRefusedError, match=(
            f"refused the login of user '{broker.runner.user}'.*password is invalid")):
        StompClient(settings=wrong, client_name="authz-test").connect()


def test_a_dispatcher_given_the_runner_identity_stays_not_ready_and_says_why(
    start_dispatcher: Callable[..., DispatcherProcess], broker: Any, tmp_path: Path,
) -> None:
    """The runner's credentials in the dispatcher's Secret (a mix-up an upgrade can
    make): the broker refuses the subscription, and the dispatcher must not look
    healthy while it consumes nothing."""
    if not isinstance(broker, ActiveMQ):
        needs_own_component("the authorization tests need the suite's own broker and its grants")
    port = free_port()
    proc = start_dispatcher(http_port=port, identity=broker.runner)
    line = f"the broker refuses user {broker.runner.user!r}"
    wait_until(lambda: line in proc.log(), timeout=60, what="the dispatcher's refusal error")
    row = next(row for row in proc.log().splitlines() if line in row)
    assert "ERROR" in row and "not authorized to read from" in row, row
    assert http_status(port, "/readyz") == 503
    assert proc.alive()

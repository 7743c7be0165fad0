"""The real ActiveMQ broker behaves as the design relies on (STOMP round trips)."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import BrokerError, BrokerRefusedError, Delivery, StompClient
from autoreduce_common.stomp_client.client import DISCONNECT_RECEIPT_S
from autoreduce_runner.broker import Poster

from dispatcher.reporting import Reporter
from tests.conftest import needs_own_component

pytestmark = pytest.mark.integration


def _consumer(
    settings: BrokerSettings, destination: str
) -> tuple[StompClient, queue.Queue[Delivery]]:
    client = StompClient(settings=settings, client_name="consumer")
    client.connect()
    sink: queue.Queue[Delivery] = queue.Queue()
    client.subscribe(destination=destination, sink=sink, prefetch=1)
    return client, sink


def test_persistent_send_and_client_individual_ack(
    stomp: StompClient, broker_settings: BrokerSettings
) -> None:
    dest = broker_settings.queues.pending
    stomp.send(destination=dest, body=json.dumps({"n": 1}).encode())
    consumer, sink = _consumer(broker_settings, dest)
    delivery = sink.get(timeout=10)
    assert json.loads(delivery.body) == {"n": 1}
    assert delivery.headers.get("persistent") == "true"
    assert consumer.ack(delivery)
    consumer.disconnect()
    # Acked: a new consumer sees nothing.
    again, sink2 = _consumer(broker_settings, dest)
    with pytest.raises(queue.Empty):
        sink2.get(timeout=2)
    again.disconnect()


def test_unacked_message_is_redelivered_after_disconnect(
    stomp: StompClient, broker_settings: BrokerSettings
) -> None:
    dest = broker_settings.queues.pending
    stomp.send(destination=dest, body=b'{"n": 2}')
    first, sink = _consumer(broker_settings, dest)
    assert sink.get(timeout=10).body == b'{"n": 2}'
    first.disconnect()  # never acked
    second, sink2 = _consumer(broker_settings, dest)
    delivery = sink2.get(timeout=10)
    assert delivery.body == b'{"n": 2}'
    assert delivery.redelivered
    second.ack(delivery)
    second.disconnect()


def test_prefetch_one_leaves_the_rest_for_other_consumers(
    stomp: StompClient, broker_settings: BrokerSettings
) -> None:
    dest = broker_settings.queues.pending
    for n in range(3):
        stomp.send(destination=dest, body=json.dumps({"n": n}).encode())
    slow, slow_sink = _consumer(broker_settings, dest)
    slow_sink.get(timeout=10)  # holds one, unacked
    fast, fast_sink = _consumer(broker_settings, dest)
    for _ in range(2):  # prefetch 1: the next comes only after the ack
        assert fast.ack(fast_sink.get(timeout=10))
    slow.disconnect()
    fast.disconnect()


def test_scheduled_delay_is_honoured(stomp: StompClient, broker_settings: BrokerSettings) -> None:
    dest = broker_settings.queues.pending
    consumer, sink = _consumer(broker_settings, dest)
    sent = time.monotonic()
    stomp.send(destination=dest, body=b'{"late": true}', delay_ms=3000)
    delivery = sink.get(timeout=20)
    waited = time.monotonic() - sent
    consumer.ack(delivery)
    consumer.disconnect()
    assert waited >= 2.5, f"delayed message arrived after {waited:.2f}s"


def test_priority_orders_waiting_messages(
    stomp: StompClient, broker_settings: BrokerSettings
) -> None:
    dest = broker_settings.queues.pending
    stomp.send(destination=dest, body=b'{"p": 0}', priority=0)
    stomp.send(destination=dest, body=b'{"p": 9}', priority=9)
    consumer, sink = _consumer(broker_settings, dest)
    first = sink.get(timeout=10)
    consumer.ack(first)
    second = sink.get(timeout=10)
    consumer.ack(second)
    consumer.disconnect()
    assert [json.loads(first.body)["p"], json.loads(second.body)["p"]] == [9, 0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_persistent_message_survives_broker_restart(
    broker, stomp: StompClient, broker_settings: BrokerSettings, sig: int
) -> None:
    dest = broker_settings.queues.pending
    stomp.send(destination=dest, body=b'{"survives": true}')
    broker.restart(sig=sig)
    # The old connection is dead: sends fail loudly instead of vanishing.
    with pytest.raises(BrokerError):
        for _ in range(50):
            stomp.send(destination=dest, body=b'{"lost": "never sent"}')
            time.sleep(0.1)
    assert stomp.ensure_connected()
    consumer, sink = _consumer(broker_settings, dest)
    delivery = sink.get(timeout=20)
    assert json.loads(delivery.body) == {"survives": True}
    consumer.ack(delivery)
    consumer.disconnect()


@pytest.mark.parametrize("heartbeats", [True, False], ids=["consumer", "outcomes"])
def test_disconnect_from_a_broker_that_does_not_answer_is_bounded(
    broker: Any, broker_settings: BrokerSettings, heartbeats: bool
) -> None:
    """A frozen broker never sends the DISCONNECT's receipt. stomp.py's own disconnect
    then waits for its I/O thread without a bound: a dispatcher outlived its SIGTERM
    after the broker-restart fault run until py-spy showed it there."""
    if not hasattr(broker, "freeze"):
        needs_own_component("cannot freeze a broker this suite did not start")
    client = StompClient(settings=broker_settings, client_name="bye", heartbeats=heartbeats)
    client.connect()
    closer = threading.Thread(target=client.disconnect, daemon=True)
    broker.freeze()
    try:
        closer.start()
        # The receipt wait and the socket close, each bounded by DISCONNECT_RECEIPT_S.
        closer.join(2 * DISCONNECT_RECEIPT_S + 5)
        assert not closer.is_alive(), "disconnect() still waits for a frozen broker"
    finally:
        broker.thaw()
    assert not client.connected


def test_wrong_password_is_a_clear_error(broker_settings: BrokerSettings) -> None:
    """The broker's own words, not "no broker reachable" (test_broker_authz.py has the
    same for the runners' user)."""
    bad = BrokerSettings.model_validate({**broker_settings.model_dump(), "password": "wrong"})
    client = StompClient(settings=bad, client_name="bad")
    with pytest.raises(BrokerRefusedError, match=r"refused the login.*password is invalid"):
        client.connect()


def _send_only(kind: str, settings: BrokerSettings) -> Callable[[bytes], None]:
    """The runner's Poster and the dispatcher's Reporter, as a plain ``send(body)``."""
    if kind == "runner":
        poster = Poster(settings=settings, connect_timeout_s=10)
        poster.connect()
        return lambda body: poster.post(destination=settings.queues.complete,
                                        message=json.loads(body))
    reporter = Reporter(
        client=StompClient(settings=settings, client_name="reporter", heartbeats=False,
                           receipt_timeout_s=settings.outcome_receipt_timeout_s),
        queues=settings.queues,
    )
    reporter.client.connect()
    return lambda body: reporter.send(destination=settings.queues.complete, body=body)


@pytest.mark.parametrize("kind", ["runner", "dispatcher"])
def test_outcome_send_rides_out_a_frozen_broker_without_a_duplicate(
    broker: Any, broker_settings: BrokerSettings, kind: str
) -> None:
    """A frozen broker (SIGSTOP) holds the SEND and owes its RECEIPT. A heartbeating
    connection would be dropped mid-freeze and the outcome resent: twice on the queue.
    The outcome connections have no heartbeats, so the send completes after the thaw,
    once."""
    if not hasattr(broker, "freeze"):
        needs_own_component("cannot freeze a broker this suite did not start")
    settings = BrokerSettings.model_validate(
        {**broker_settings.model_dump(), "heartbeat_ms": 1000,
         "password": broker_settings.password.get_secret_value()})
    send = _send_only(kind, settings)
    errors: list[BaseException] = []

    def post() -> None:
        try:
            send(b'{"run_number": 1, "frozen": true}')
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    broker.freeze()
    try:
        sender = threading.Thread(target=post, daemon=True)
        sender.start()
        sender.join(8)  # eight heartbeat periods: a heartbeating client gives up in ~2
        assert sender.is_alive(), f"the send gave up during the freeze: {errors}"
    finally:
        broker.thaw()
    sender.join(60)
    assert not sender.is_alive() and not errors, errors
    consumer, sink = _consumer(broker_settings, broker_settings.queues.complete)
    received = [sink.get(timeout=20)]
    consumer.ack(received[0])
    with contextlib.suppress(queue.Empty):
        while True:
            received.append(sink.get(timeout=3))
            consumer.ack(received[-1])
    consumer.disconnect()
    assert [json.loads(d.body) for d in received] == [{"run_number": 1, "frozen": True}]

"""The real ActiveMQ broker behaves as the design relies on (STOMP round trips)."""

from __future__ import annotations

import json
import queue
import signal
import time

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import BrokerError, Delivery, StompClient

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


def test_wrong_password_is_a_clear_error(broker_settings: BrokerSettings) -> None:
    bad = BrokerSettings.model_validate({**broker_settings.model_dump(), "password": "wrong"})
    client = StompClient(settings=bad, client_name="bad")
    with pytest.raises(BrokerError, match="no broker reachable"):
        client.connect()

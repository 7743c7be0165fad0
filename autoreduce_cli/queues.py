"""Reading the broker's queues without consuming: browsing, and taking one message.

Following a run browses the outcome queues; the dead-letter commands browse and
take from the dead-letter queue.
"""

from __future__ import annotations

import queue

from autoreduce_common.stomp_client import BrokerError, Delivery, StompClient

BROWSE_TIMEOUT_S = 10.0


def browse(client: StompClient, destination: str, *, selector: str | None = None) -> list[Delivery]:
    """Every message on a queue, left where it is (ActiveMQ queue browser)."""
    sink: queue.Queue[Delivery] = queue.Queue()
    headers = {"browser": "true"}
    if selector:
        headers["selector"] = selector
    client.subscribe(destination=destination, sink=sink, prefetch=500, headers=headers)
    found: list[Delivery] = []
    try:
        while True:
            try:
                delivery = sink.get(timeout=BROWSE_TIMEOUT_S)
            except queue.Empty as error:
                raise BrokerError(
                    f"browsing {destination}: no end-of-browse from the broker"
                ) from error
            if delivery.headers.get("browser") == "end":
                return found
            found.append(delivery)
    finally:
        client.unsubscribe(sink)


def take(client: StompClient, destination: str, message_id: str) -> Delivery | None:
    """Receive (unacked) the one message with this id, or None if it is not there."""
    sink: queue.Queue[Delivery] = queue.Queue()
    quoted = message_id.replace("'", "''")
    client.subscribe(
        destination=destination,
        sink=sink,
        prefetch=1,
        headers={"selector": f"JMSMessageID = '{quoted}'"},
    )
    try:
        return sink.get(timeout=3.0)
    except queue.Empty:
        client.unsubscribe(sink)
        return None

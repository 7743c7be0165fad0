"""Consuming: subscriptions (remembered, so a reconnect restores them), routing, acks.

Deliveries go to the caller's queue, so the work happens on the caller's thread, not
on stomp.py's. Each carries its connection's generation: an ack for a delivery of a
connection that is gone is refused here, and the broker redelivers the message.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

import stomp.exception

from autoreduce_common.stomp_client.receipts import _Receipts
from autoreduce_common.stomp_client.types import BrokerError, Delivery, _Subscription

log = logging.getLogger(__package__)


class _Subscriptions(_Receipts):
    """Built on the receipts part: a SUBSCRIBE waits for its receipt like a SEND."""

    def subscribe(
        self,
        *,
        destination: str,
        sink: queue.Queue[Delivery],
        prefetch: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Subscribe with client-individual acks; deliveries go to ``sink``.
        BrokerError (BrokerRefusedError when the broker says no) when the broker did
        not confirm it; the subscription is remembered all the same.

        ``headers`` go on the SUBSCRIBE frame: ActiveMQ reads ``browser: true``
        (look at a queue without consuming; the last frame has ``browser: end``) and
        ``selector`` (a JMS selector, e.g. ``JMSMessageID = 'ID:...'``).
        """
        sub = _Subscription(
            destination=destination, sink=sink, prefetch=prefetch, headers=dict(headers or {})
        )
        with self._lock:
            self._subscriptions.append(sub)
            if self._conn is not None:
                try:
                    self._subscribe_on_wire(sub)
                except BrokerError:
                    # No connection stays up without the subscription it was asked
                    # for: reconnecting subscribes again, with backoff and a log line
                    # that says why, until the broker allows it (or unsubscribe).
                    self._teardown()
                    raise

    def unsubscribe(self, sink: queue.Queue[Delivery]) -> None:
        """Drop every subscription feeding ``sink`` (unacked messages go back)."""
        with self._lock:
            gone = [sub for sub in self._subscriptions if sub.sink is sink]
            self._subscriptions = [sub for sub in self._subscriptions if sub.sink is not sink]
            for sub in gone:
                if self._conn is not None and self._connected.is_set():
                    try:
                        self._conn.unsubscribe(id=sub.sub_id)
                    except (stomp.exception.StompException, OSError) as error:
                        log.debug("unsubscribe: %s", error)

    def _subscribe_on_wire(self, sub: _Subscription) -> None:
        """Subscribe and wait for the broker's receipt: a subscription its
        authorization refuses is a BrokerRefusedError, not a consumer that silently
        never receives anything."""
        receipt = f"sub-{next(self._receipt_ids)}-{sub.sub_id}"
        waiter = threading.Event()
        self._receipts[receipt] = waiter
        try:
            self._conn.subscribe(
                destination=sub.destination,
                id=sub.sub_id,
                ack="client-individual",
                # Without this ActiveMQ pushes the whole queue into one consumer.
                headers={"activemq.prefetchSize": str(sub.prefetch), **sub.headers,
                         "receipt": receipt},
            )
        except (stomp.exception.StompException, OSError) as error:
            self._receipts.pop(receipt, None)
            raise BrokerError(f"subscribe to {sub.destination} failed: {error}") from error
        self._await_receipt(receipt, waiter, what=f"subscribe to {sub.destination}")

    def ack(self, delivery: Delivery) -> bool:
        """Ack; False when the delivery's connection is gone (it will be redelivered)."""
        with self._lock:
            if delivery.generation != self._generation or self._conn is None:
                return False
            try:
                self._conn.ack(id=delivery.ack_id)
            except (stomp.exception.StompException, OSError) as error:
                log.warning("ack failed (message will be redelivered): %s", error)
                return False
            return True

    # -- callbacks from the listener thread ------------------------------------------

    def _on_message(self, frame: Any, generation: int) -> None:
        headers = dict(frame.headers)
        sub_id = headers.get("subscription", "")
        body = frame.body if isinstance(frame.body, bytes) else str(frame.body).encode()
        for sub in self._subscriptions:
            if sub.sub_id == sub_id:
                sub.sink.put(
                    Delivery(
                        body=body,
                        headers=headers,
                        ack_id=str(headers.get("ack") or headers.get("message-id") or ""),
                        generation=generation,
                        destination=sub.destination,
                    )
                )
                return
        log.warning("message for unknown subscription %r dropped (will be redelivered)", sub_id)

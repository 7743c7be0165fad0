"""The one place that imports ``stomp``: a small, explicit STOMP 1.2 client.

Why not use stomp.py directly everywhere: it never reconnects after a connection
is lost, sends are fire-and-forget unless a receipt is awaited, and its listener
runs on the transport's thread. This wrapper fixes all three: sends wait for the
broker's RECEIPT (so "sent" means "the broker has it"), deliveries are handed to
the caller's queue (work happens on the caller's thread), and ``ensure_connected``
reconnects with backoff across a list of hosts and re-subscribes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import stomp
import stomp.exception

from autoreduce_common.broker_settings import BrokerSettings

log = logging.getLogger(__name__)


class BrokerError(Exception):
    """The broker could not be reached or refused an operation."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to the consumer; ack it with the client that made it."""

    body: bytes
    headers: Mapping[str, str]
    ack_id: str
    generation: int  # connection generation: acks from a dead connection are moot
    destination: str = ""

    @property
    def redelivered(self) -> bool:
        return self.headers.get("redelivered", "false") == "true"


@dataclass
class _Subscription:
    destination: str
    sink: queue.Queue[Delivery]
    prefetch: int
    sub_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Extra SUBSCRIBE headers, e.g. ``browser: true`` or a ``selector``.
    headers: dict[str, str] = field(default_factory=dict)


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: only hands things over, never works."""

    def __init__(self, client: StompClient, generation: int) -> None:
        self._client = client
        self._generation = generation

    def on_message(self, frame: Any) -> None:
        self._client._on_message(frame, self._generation)

    def on_receipt(self, frame: Any) -> None:
        self._client._on_receipt(frame.headers.get("receipt-id", ""))

    def on_error(self, frame: Any) -> None:
        log.warning("broker ERROR frame: %s", frame.headers.get("message", "")[:500])
        self._client._on_error(frame.headers.get("receipt-id", ""))

    def on_disconnected(self) -> None:
        self._client._on_disconnected(self._generation)

    def on_heartbeat_timeout(self) -> None:
        log.warning("broker heartbeat timed out")


class StompClient:
    """A reconnecting STOMP 1.2 client; safe to call from several threads."""

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        client_name: str,
        heartbeats: bool = True,
        receipt_timeout_s: float | None = None,
    ) -> None:
        self._settings = settings
        self._client_name = client_name
        # Off for connections that only send: a missed heartbeat makes stomp.py drop
        # the socket, and a SEND whose RECEIPT a frozen broker still owes would then be
        # resent on a new connection and delivered twice. Without heartbeats the frame
        # waits in the socket until the broker thaws and confirms it on the same
        # connection; a broker that really goes away closes the socket.
        self._heartbeats = heartbeats
        self._receipt_timeout_s = receipt_timeout_s or settings.receipt_timeout_s
        self._lock = threading.RLock()
        self._conn: Any = None
        self._generation = 0
        self._connected = threading.Event()
        self._receipts: dict[str, threading.Event] = {}
        self._failed_receipts: set[str] = set()
        self._subscriptions: list[_Subscription] = []
        self._receipt_ids = itertools.count()
        self.reconnects = 0  # read by metrics

    # -- connection -----------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes on every (re)connect: deliveries of older generations cannot be acked."""
        return self._generation

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self) -> None:
        """Connect once, trying each host in order; raise BrokerError if none answers."""
        with self._lock:
            self._teardown()
            errors = []
            for host_port in self._settings.host_and_ports():
                try:
                    self._open(host_port)
                    return
                except (stomp.exception.StompException, OSError) as error:
                    errors.append(f"{host_port[0]}:{host_port[1]}: {error or type(error).__name__}")
            raise BrokerError("no broker reachable: " + "; ".join(errors))

    def _open(self, host_port: tuple[str, int]) -> None:
        heartbeat = self._settings.heartbeat_ms if self._heartbeats else 0
        conn = stomp.Connection12(
            host_and_ports=[host_port],
            heartbeats=(heartbeat, heartbeat),
            reconnect_attempts_max=1,
            auto_decode=False,
            timeout=10,
        )
        self._generation += 1
        conn.set_listener("autoreduce", _Listener(self, self._generation))
        conn.connect(
            username=self._settings.username,
            passcode=self._settings.password.get_secret_value(),
            wait=True,
            headers={"client-id": f"{self._client_name}-{uuid.uuid4().hex[:8]}"},
        )
        if not conn.is_connected():
            raise BrokerError(f"broker at {host_port[0]}:{host_port[1]} refused the connection")
        self._conn = conn
        self._connected.set()
        for sub in self._subscriptions:
            self._subscribe_on_wire(sub)
        log.info("connected to broker %s:%s", *host_port)

    def ensure_connected(self, *, stop: threading.Event | None = None) -> bool:
        """Reconnect with exponential backoff until connected or ``stop`` is set."""
        delay = self._settings.reconnect_initial_s
        while not self.connected:
            if stop is not None and stop.is_set():
                return False
            try:
                self.connect()
                self.reconnects += 1
                return True
            except BrokerError as error:
                log.warning("broker unavailable, retrying in %.1fs: %s", delay, error)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(delay * 2, self._settings.reconnect_max_s)
        return True

    def disconnect(self) -> None:
        with self._lock:
            self._subscriptions.clear()
            self._teardown()

    def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        # A deliberate disconnect: the listener's on_disconnected must not cry wolf,
        # and acks for deliveries of the old connection become no-ops.
        self._generation += 1
        if conn is None:
            return
        try:
            conn.disconnect()
        except (stomp.exception.StompException, OSError) as error:
            log.debug("disconnect: %s", error)

    # -- sending -------------------------------------------------------------------

    def send(
        self,
        *,
        destination: str,
        body: bytes,
        persistent: bool = True,
        priority: int | None = None,
        delay_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Send and wait for the broker's RECEIPT; BrokerError if it did not arrive.

        ``on_sent`` runs once the frame is written, before the receipt is awaited (the
        runner's fault points use it to die in exactly that window).
        """
        frame_headers = {"persistent": "true" if persistent else "false"}
        frame_headers["content-type"] = "application/json"
        if priority is not None:
            frame_headers["priority"] = str(priority)
        if delay_ms:
            # ActiveMQ honours this only with schedulerSupport="true" on the broker.
            frame_headers["AMQ_SCHEDULED_DELAY"] = str(delay_ms)
        frame_headers.update(headers or {})
        receipt = f"r-{next(self._receipt_ids)}-{uuid.uuid4().hex[:6]}"
        waiter = threading.Event()
        with self._lock:
            conn = self._require_conn()
            self._receipts[receipt] = waiter
            try:
                conn.send(
                    destination=destination, body=body, headers=frame_headers, receipt=receipt
                )
            except (stomp.exception.StompException, OSError) as error:
                self._receipts.pop(receipt, None)
                raise BrokerError(f"send to {destination} failed: {error}") from error
        if on_sent is not None:
            on_sent()
        self._await_receipt(receipt, waiter, what=f"send to {destination}")

    def _await_receipt(self, receipt: str, waiter: threading.Event, *, what: str) -> None:
        try:
            if not waiter.wait(self._receipt_timeout_s):
                raise BrokerError(f"{what}: no receipt from the broker")
            if receipt in self._failed_receipts:
                raise BrokerError(f"{what}: the broker rejected it")
        finally:
            self._receipts.pop(receipt, None)
            self._failed_receipts.discard(receipt)

    def _require_conn(self) -> Any:
        if self._conn is None or not self._connected.is_set():
            raise BrokerError("not connected to the broker")
        return self._conn

    # -- consuming -----------------------------------------------------------------

    def subscribe(
        self,
        *,
        destination: str,
        sink: queue.Queue[Delivery],
        prefetch: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Subscribe with client-individual acks; deliveries go to ``sink``.

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
                self._subscribe_on_wire(sub)

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
        self._conn.subscribe(
            destination=sub.destination,
            id=sub.sub_id,
            ack="client-individual",
            # Without this ActiveMQ pushes the whole queue into one consumer.
            headers={"activemq.prefetchSize": str(sub.prefetch), **sub.headers},
        )

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

    def _on_receipt(self, receipt: str) -> None:
        waiter = self._receipts.get(receipt)
        if waiter is not None:
            waiter.set()

    def _on_error(self, receipt: str) -> None:
        if receipt and receipt in self._receipts:
            self._failed_receipts.add(receipt)
            self._receipts[receipt].set()

    def _on_disconnected(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._connected.clear()
        # Wake every sender waiting on a receipt that will never come.
        for receipt, waiter in list(self._receipts.items()):
            self._failed_receipts.add(receipt)
            waiter.set()
        log.warning("lost the broker connection")

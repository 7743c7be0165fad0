"""The one package that imports ``stomp``: a small, explicit STOMP 1.2 client.

Why not use stomp.py directly everywhere: it never reconnects after a connection
is lost, sends are fire-and-forget unless a receipt is awaited, and its listener
runs on the transport's thread. This wrapper fixes all three: sends wait for the
broker's RECEIPT (so "sent" means "the broker has it"), deliveries are handed to
the caller's queue (work happens on the caller's thread), and ``ensure_connected``
reconnects with backoff across a list of hosts and re-subscribes.

A package, one concern a module; import from here, not from them:

- ``types``: ``BrokerError`` and its kinds, ``Delivery`` and the remembered subscription (pure);
- ``tls``: the TLS context, and the reason a handshake failed (no stomp);
- ``state``: the fields all parts share, and the one constructor that sets them;
- ``listener``: the hand-over from stomp.py's receiver thread;
- ``receipts``: ``send`` and the RECEIPT bookkeeping;
- ``subscriptions``: ``subscribe`` (confirmed by a receipt), ``unsubscribe``, routing
  deliveries, ``ack``;
- ``client``: ``StompClient``, the connection (connect, reconnect, teardown).

``StompClient`` is still one class with the same methods: it inherits the receipt
and subscription parts rather than holding helper objects, because every part works
on the same lock, connection and generation. Helpers would each need that state
handed back to them; inheriting let every method move unchanged.
A profile still names ``StompClient._await_receipt`` (bench/profiled.py watches
it), and every module logs as ``autoreduce_common.stomp_client``.
"""

from autoreduce_common.stomp_client.client import StompClient
from autoreduce_common.stomp_client.types import (
    BrokerError,
    BrokerRefusedError,
    BrokerTlsError,
    Delivery,
)

__all__ = ["BrokerError", "BrokerRefusedError", "BrokerTlsError", "Delivery", "StompClient"]

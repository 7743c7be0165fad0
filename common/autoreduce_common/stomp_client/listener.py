"""The hand-over from stomp.py's receiver thread to the client.

A separate module because it is the one thread boundary: everything here runs on
stomp.py's thread, so it only forwards to the client's ``_on_*`` callbacks, which
only record or enqueue. One listener per connection carries that connection's
generation, so late callbacks from a dead connection are recognised.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import stomp

if TYPE_CHECKING:
    from autoreduce_common.stomp_client.client import StompClient

log = logging.getLogger(__package__)


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: only hands things over, never works."""

    def __init__(self, client: StompClient, generation: int) -> None:
        self._client = client
        self._generation = generation

    def on_message(self, frame: Any) -> None:
        self._client._on_heard(self._generation)
        self._client._on_message(frame, self._generation)

    def on_receipt(self, frame: Any) -> None:
        self._client._on_heard(self._generation)
        self._client._on_receipt(frame.headers.get("receipt-id", ""))

    def on_heartbeat(self) -> None:
        self._client._on_heard(self._generation)

    def on_error(self, frame: Any) -> None:
        message = str(frame.headers.get("message", ""))[:500]
        log.warning("broker ERROR frame: %s", message)
        self._client._on_error(frame.headers.get("receipt-id", ""), message)

    def on_disconnected(self) -> None:
        self._client._on_disconnected(self._generation)

    def on_heartbeat_timeout(self) -> None:
        log.warning("broker heartbeat timed out")
        # Over TLS stomp.py's I/O thread waits in select() on a socket it has just
        # unregistered, so its on_disconnected never comes: treat the timeout as the
        # loss (the client then reconnects, and readiness turns false meanwhile).
        self._client._on_disconnected(self._generation)

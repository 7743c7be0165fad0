"""The fields every part of ``StompClient`` shares, set by its one constructor.

``StompClient`` holds the connection code and inherits the receipt and subscription
parts; all three read and write the same lock, connection and generation. Putting
the constructor here, in the class every part inherits, states each field and its
type once (mypy infers them) instead of re-declaring them in every part.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client.types import _Subscription


class _ClientState:
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
        # Receipts that failed, with why: the broker's ERROR message, or "" for a lost
        # connection.
        self._failed_receipts: dict[str, str] = {}
        self._subscriptions: list[_Subscription] = []
        # The broker's last ERROR message, to say why a CONNECT was refused.
        self._last_refusal = ""
        self._receipt_ids = itertools.count()
        self.reconnects = 0  # read by metrics
        # When the broker was last heard from (any frame or heartbeat), for ``answering``.
        self._last_heard = time.monotonic()

    def _teardown(self) -> None:
        """Drop the connection (``StompClient`` has the real one)."""
        raise NotImplementedError

"""Sending, and the RECEIPT bookkeeping that makes "sent" mean "the broker has it".

Each SEND (and SUBSCRIBE) carries a receipt id and a waiter; the listener's RECEIPT
or ERROR frame sets the waiter (an ERROR also marks the receipt failed, with the
broker's message), and a lost connection fails every waiter at once
(``StompClient._on_disconnected``).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import stomp.exception

from autoreduce_common.stomp_client.state import _ClientState
from autoreduce_common.stomp_client.types import BrokerError, BrokerRefusedError


class _Receipts(_ClientState):
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
                refusal = self._failed_receipts[receipt]
                if refusal:
                    raise BrokerRefusedError(f"{what}: the broker refused it: {refusal}")
                raise BrokerError(f"{what}: the connection was lost before the receipt")
        finally:
            self._receipts.pop(receipt, None)
            self._failed_receipts.pop(receipt, None)

    def _require_conn(self) -> Any:
        if self._conn is None or not self._connected.is_set():
            raise BrokerError("not connected to the broker")
        return self._conn

    # -- callbacks from the listener thread ------------------------------------------

    def _on_receipt(self, receipt: str) -> None:
        waiter = self._receipts.get(receipt)
        if waiter is not None:
            waiter.set()

    def _on_error(self, receipt: str, message: str) -> None:
        self._last_refusal = message
        if receipt and receipt in self._receipts:
            self._failed_receipts[receipt] = message or "an ERROR frame without a message"
            self._receipts[receipt].set()

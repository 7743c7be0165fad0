"""The values the client hands out and keeps: plain data, no stomp and no I/O.

``BrokerError`` (and its ``BrokerTlsError`` and ``BrokerRefusedError``) and
``Delivery`` are what callers catch and ack; ``_Subscription`` is what the client
remembers so that a reconnect can subscribe again.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field


class BrokerError(Exception):
    """The broker could not be reached or refused an operation."""


class BrokerTlsError(BrokerError):
    """TLS to the broker fails for a reason retrying cannot fix (an untrusted, expired
    or misnamed certificate, unreadable TLS files): someone has to change a setting."""


class BrokerRefusedError(BrokerError):
    """The broker answered CONNECT, SEND or SUBSCRIBE with an ERROR frame: a login it
    refuses (a wrong or just rotated password, an unknown user) or its authorization
    refusing this user the destination. Sending again at once will not help; the
    message is the broker's own."""


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

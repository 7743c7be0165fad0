"""What the dispatcher asks of its broker connection, as a protocol.

``stomp_client.StompClient`` is the implementation; unit tests of the orchestration
use an in-memory one (``tests/unit/memory_transport.py``). Only this surface is
relied on, so a second transport never needs stomp.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from autoreduce_common.stomp_client import Delivery


class Transport(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def generation(self) -> int: ...

    reconnects: int

    def connect(self) -> None: ...

    def ensure_connected(self, *, stop: threading.Event | None = None) -> bool: ...

    def disconnect(self) -> None: ...

    def send(self, *, destination: str, body: bytes, persistent: bool = True,
             priority: int | None = None, delay_ms: int | None = None,
             headers: Mapping[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None: ...

    def subscribe(self, *, destination: str, sink: queue.Queue[Delivery],
                  prefetch: int) -> None: ...

    def ack(self, delivery: Delivery) -> bool: ...

"""An in-memory ``autoreduce_common.transport.Transport``: what the dispatcher sends
and acks, recorded, for unit tests of the orchestration (never an integration test).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from autoreduce_common.stomp_client import BrokerError, Delivery


@dataclass(frozen=True)
class Sent:
    destination: str
    body: bytes
    headers: Mapping[str, str]


@dataclass
class MemoryTransport:
    pending: list[bytes] = field(default_factory=list)  # delivered on subscribe
    sent: list[Sent] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    fail_sends: int = 0  # the next sends raise BrokerError (no receipt)
    reconnects: int = 1
    _connected: bool = True
    _generation: int = 1

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def generation(self) -> int:
        return self._generation

    def connect(self) -> None:
        self._connected = True

    def ensure_connected(self, *, stop: threading.Event | None = None) -> bool:
        self._connected = True
        return True

    def disconnect(self) -> None:
        self._connected = False
        self._generation += 1

    def send(self, *, destination: str, body: bytes, persistent: bool = True,
             priority: int | None = None, delay_ms: int | None = None,
             headers: Mapping[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None:
        if self.fail_sends:
            self.fail_sends -= 1
            raise BrokerError(f"no receipt for a send to {destination}")
        self.sent.append(Sent(destination, body, dict(headers or {})))

    def subscribe(self, *, destination: str, sink: queue.Queue[Delivery],
                  prefetch: int = 1) -> None:
        for index, body in enumerate(self.pending):
            sink.put(Delivery(body=body, headers={"message-id": f"ID:{index}"},
                              ack_id=f"ack-{index}", generation=self._generation))

    def ack(self, delivery: Delivery) -> bool:
        self.acked.append(delivery.ack_id)
        return True

    def to(self, destination: str) -> list[Sent]:
        return [s for s in self.sent if s.destination == destination]

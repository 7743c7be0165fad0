"""A reader of outcome queues for the tests and the demo: its own connection, every
message acked and kept, waits that say what they saw when they time out."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import Delivery, StompClient


class QueueReader:
    """Collects messages from destinations on its own connection, acking each."""

    def __init__(self, settings: BrokerSettings) -> None:
        self._client = StompClient(settings=settings, client_name="test-reader")
        self._client.connect()
        self._sink: queue.Queue[Delivery] = queue.Queue()
        self.seen: list[Delivery] = []

    def watch(self, destination: str) -> None:
        self._client.subscribe(destination=destination, sink=self._sink, prefetch=100)

    def _drain(self, timeout: float) -> None:
        if not self._client.connected:  # a broker restart in a fault test
            self._client.ensure_connected()
        try:
            delivery = self._sink.get(timeout=timeout)
        except queue.Empty:
            return
        self._client.ack(delivery)
        self.seen.append(delivery)

    def wait_for(
        self, predicate: Callable[[list[Delivery]], bool], *, timeout: float = 60.0
    ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                summary = [(d.destination, d.body[:200]) for d in self.seen]
                raise AssertionError(f"timed out after {timeout}s; seen: {summary}")
            self._drain(min(remaining, 0.5))
        return self.seen

    def bodies(self, destination: str) -> list[dict[str, Any]]:
        return [json.loads(d.body) for d in self.seen if d.destination == destination]

    def settle(self, seconds: float) -> None:
        """Collect for a while longer (to prove that nothing else arrives)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._drain(deadline - time.monotonic())

    def close(self) -> None:
        self._client.disconnect()

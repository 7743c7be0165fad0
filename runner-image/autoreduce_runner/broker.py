"""Posting outcome messages: connect with a deadline, send, reconnect once."""

from __future__ import annotations

import logging
import time
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.messages import encode
from autoreduce_common.stomp_client import BrokerError, StompClient

log = logging.getLogger(__name__)


class Poster:
    """One STOMP connection for the runner's two sends (Started and the outcome)."""

    def __init__(self, *, settings: BrokerSettings, connect_timeout_s: float) -> None:
        self._settings = settings
        self._connect_timeout_s = connect_timeout_s
        self._client = StompClient(settings=settings, client_name="autoreduce-runner")

    def connect(self) -> None:
        """Connect, retrying with backoff until the timeout; BrokerError after it."""
        deadline = time.monotonic() + self._connect_timeout_s
        delay = self._settings.reconnect_initial_s
        while True:
            try:
                self._client.connect()
                return
            except BrokerError as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                log.warning("broker unavailable (%s); retrying in %.1f s", error, delay)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, self._settings.reconnect_max_s)

    def post(self, *, destination: str, message: dict[str, Any]) -> None:
        """Send persistently and wait for the receipt; one reconnect on failure.

        A lost receipt can mean the broker has the message after all, so a resend
        may duplicate it: consumers key on the run, and a duplicate beats a loss.
        """
        body = encode(message)
        try:
            if not self._client.connected:
                self.connect()
            self._client.send(destination=destination, body=body)
        except BrokerError as error:
            log.warning("send to %s failed (%s); reconnecting once", destination, error)
            self.connect()
            self._client.send(destination=destination, body=body)

    def close(self) -> None:
        self._client.disconnect()

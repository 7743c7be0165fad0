"""Posting outcome messages: one short connection per message, confirmed by a receipt."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.messages import encode
from autoreduce_common.pod_contract import POSSIBLE_REPEAT_HEADER
from autoreduce_common.stomp_client import (
    BrokerError,
    BrokerRefusedError,
    BrokerTlsError,
    StompClient,
)

log = logging.getLogger(__name__)


class OutcomePoster(Protocol):
    """How the runner posts: ``Poster`` itself, or through the pod's poster sidecar
    (``autoreduce_runner.sidecar_client.SidecarPoster``)."""

    def connect(self) -> None: ...

    def post(self, *, destination: str, message: dict[str, Any],
             headers: dict[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None: ...

    def close(self) -> None: ...


class Poster:
    """Sends Started and the outcome, each on a connection opened for it.

    The connection has no heartbeats and waits ``outcome_receipt_timeout_s`` for the
    receipt: when the broker stalls (GC pause, frozen host, SIGSTOP) the SEND waits in
    the socket and is confirmed once it thaws. With heartbeats, stomp.py would drop
    the connection mid-stall and our resend would be delivered a second time. Only a
    connection the broker really closed (or a receipt that never came in the long
    timeout) leads to one resend, which may then duplicate: a duplicate beats a loss.
    A connection per message also means nothing idles through an hours-long script.
    """

    def __init__(self, *, settings: BrokerSettings, connect_timeout_s: float) -> None:
        self._settings = settings
        self._connect_timeout_s = connect_timeout_s
        self._client = self._new_client()

    def _new_client(self) -> StompClient:
        return StompClient(
            settings=self._settings,
            client_name="autoreduce-runner",
            heartbeats=False,
            receipt_timeout_s=self._settings.outcome_receipt_timeout_s,
        )

    def connect(self) -> None:
        """Connect, retrying with backoff until the timeout; BrokerError after it."""
        deadline = time.monotonic() + self._connect_timeout_s
        delay = self._settings.reconnect_initial_s
        while True:
            try:
                self._client.connect()
                return
            except BrokerTlsError:
                raise  # a certificate or a setting to fix: waiting will not help
            except BrokerError as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                log.warning("broker unavailable (%s); retrying in %.1f s", error, delay)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, self._settings.reconnect_max_s)

    def post(self, *, destination: str, message: dict[str, Any],
             headers: dict[str, str] | None = None,
             on_sent: Callable[[], None] | None = None) -> None:
        """Send persistently and wait for the receipt; one resend on failure.

        The connection stays open after a confirmed send: the caller records "posted"
        first and closes after, so a kill during the close is already on record.
        """
        body = encode(message)
        try:
            self._send_once(destination, body, headers, on_sent)
        except BrokerRefusedError:
            # The broker said no (its authorization, most often): it holds no copy,
            # and a second try gets the same answer.
            raise
        except BrokerError as error:
            log.warning(
                "send to %s not confirmed (%s); reconnecting to send it again", destination, error
            )
            # The first copy may have reached the broker with only its receipt lost.
            again = {**(headers or {}), POSSIBLE_REPEAT_HEADER: "true"}
            self._send_once(destination, body, again, None)

    def _send_once(self, destination: str, body: bytes, headers: dict[str, str] | None,
                   on_sent: Callable[[], None] | None) -> None:
        try:
            if not self._client.connected:
                self.connect()
            self._client.send(destination=destination, body=body, headers=headers,
                              on_sent=on_sent)
        except BrokerError:
            self.close()
            raise

    def close(self) -> None:
        if not close_within(self._client.disconnect, timeout_s=CLOSE_TIMEOUT_S):
            # The stuck teardown holds that client's lock: post on a new one.
            self._client = self._new_client()


# How long closing an outcome's connection may take before it is left behind.
CLOSE_TIMEOUT_S = 10.0


def close_within(close: Callable[[], None], *, timeout_s: float) -> bool:
    """Run ``close``, waiting at most ``timeout_s``; False when it is still running.
    A close comes after the receipt (the outcome is confirmed and on record) or after
    a failed send, and a broker that died just then can leave stomp.py's teardown
    waiting on a peer that never answers: the pod must still end."""
    closer = threading.Thread(target=close, name="broker-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("the broker connection did not close within %.0f s; left behind",
                    timeout_s)
        return False
    return True

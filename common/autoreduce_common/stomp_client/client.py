"""``StompClient``: the connection (connect, reconnect with backoff, teardown).

The class is assembled from its parts: it inherits subscriptions and acks
(``_Subscriptions``), built on sending and receipts (``_Receipts``), which share the
fields of ``_ClientState``. Reconnecting lives here because it touches both: a new
connection gets a new generation (old deliveries can no longer be acked) and every
remembered subscription is sent again; a lost one fails every pending receipt.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import stomp
import stomp.exception

from autoreduce_common.stomp_client import tls
from autoreduce_common.stomp_client.listener import _Listener
from autoreduce_common.stomp_client.receipts import _Receipts
from autoreduce_common.stomp_client.subscriptions import _Subscriptions
from autoreduce_common.stomp_client.types import BrokerError, BrokerRefusedError, BrokerTlsError

log = logging.getLogger(__package__)

# How long a deliberate disconnect waits for the broker to confirm it.
DISCONNECT_RECEIPT_S = 5.0


class StompClient(_Subscriptions, _Receipts):
    """A reconnecting STOMP 1.2 client; safe to call from several threads.

    Its keyword-only constructor is ``_ClientState.__init__``, where the fields
    every part shares are set.
    """

    @property
    def generation(self) -> int:
        """Changes on every (re)connect: deliveries of older generations cannot be acked."""
        return self._generation

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def answering(self) -> bool:
        """Connected, and (with heartbeats) heard from within 1.5 heartbeats: what
        readiness reports. stomp.py notices a silent broker later than that over TLS:
        its teardown waits on the frozen peer's TLS close before anyone is told."""
        if not self.connected:
            return False
        if not self._heartbeats or not self._settings.heartbeat_ms:
            return True
        silent_s = time.monotonic() - self._last_heard
        return silent_s <= 1.5 * self._settings.heartbeat_ms / 1000

    def _on_heard(self, generation: int) -> None:
        if generation == self._generation:
            self._last_heard = time.monotonic()

    def connect(self) -> None:
        """Connect once, trying each host in order; raise BrokerError if none answers."""
        with self._lock:
            self._teardown()
            errors, tls_errors, refusals = [], [], []
            for host_port in self._settings.host_and_ports():
                where = f"{host_port[0]}:{host_port[1]}"
                try:
                    self._open(host_port)
                    return
                except (stomp.exception.StompException, OSError) as error:
                    if self._last_refusal:  # it answered CONNECT with an ERROR frame
                        refusals.append(f"{where}: {self._last_refusal}")
                        continue
                    errors.append(f"{where}: {error or type(error).__name__}")
                    reason = self._tls_reason(host_port)
                    if reason is not None:
                        tls_errors.append(f"TLS to {where}: {reason}")
            if tls_errors:
                raise BrokerTlsError("; ".join(tls_errors))
            if refusals:
                # A wrong or rotated password, or an unknown user: not an outage.
                raise BrokerRefusedError(f"the broker refused the login of user "
                                         f"{self._settings.username!r}: " + "; ".join(refusals))
            raise BrokerError("no broker reachable: " + "; ".join(errors))

    def _tls_reason(self, host_port: tuple[str, int]) -> str | None:
        """Why TLS to this host fails for good, when that is why it failed."""
        if not self._settings.tls.enabled:
            return None
        return tls.diagnose(host_port[0], host_port[1], self._settings.tls)

    def _open(self, host_port: tuple[str, int]) -> None:
        heartbeat = self._settings.heartbeat_ms if self._heartbeats else 0
        conn = stomp.Connection12(
            host_and_ports=[host_port],
            heartbeats=(heartbeat, heartbeat),
            reconnect_attempts_max=1,
            auto_decode=False,
            timeout=10,
        )
        if self._settings.tls.enabled:
            # Load the files ourselves first: stomp.py, given one it cannot find, retries
            # for ever without a word of which.
            problem = tls.unloadable(self._settings.tls)
            if problem is not None:
                raise BrokerTlsError(problem)
            conn.set_ssl(for_hosts=[host_port], **tls.stomp_params(self._settings.tls))
        self._generation += 1
        self._last_refusal = ""
        conn.set_listener("autoreduce", _Listener(self, self._generation))
        try:
            conn.connect(
                username=self._settings.username,
                passcode=self._settings.current_password(),
                wait=True,
                headers={"client-id": f"{self._client_name}-{uuid.uuid4().hex[:8]}"},
            )
        except stomp.exception.ConnectFailedException:
            self._await_refusal()
            raise
        if not conn.is_connected():
            if self._await_refusal():
                raise stomp.exception.ConnectFailedException(self._last_refusal)
            raise BrokerError(f"broker at {host_port[0]}:{host_port[1]} refused the connection")
        self._conn = conn
        self._last_heard = time.monotonic()
        self._connected.set()
        try:
            for sub in self._subscriptions:
                self._subscribe_on_wire(sub)
        except BrokerError:
            # Refused (or lost) on the way: no half-subscribed connection stays up
            # looking healthy while it consumes nothing.
            self._teardown()
            raise
        log.info("connected to broker %s:%s", *host_port)

    def _await_refusal(self, timeout_s: float = 0.5) -> str:
        """The broker's reason for refusing a CONNECT. stomp.py can give up on the
        CONNECT (its flag is set first) before its thread has handed us the ERROR
        frame; over TLS that happens about one time in three."""
        deadline = time.monotonic() + timeout_s
        while not self._last_refusal and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._last_refusal

    def ensure_connected(self, *, stop: threading.Event | None = None) -> bool:
        """Reconnect with exponential backoff until connected or ``stop`` is set."""
        delay = self._settings.reconnect_initial_s
        while not self.connected:
            if stop is not None and stop.is_set():
                return False
            try:
                self.connect()
                self.reconnects += 1
                return True
            except BrokerError as error:
                if isinstance(error, BrokerTlsError):
                    # Not an outage: it lasts until someone fixes a certificate or a
                    # setting (the files are read again on every attempt).
                    log.error("broker TLS fails, retrying in %.1fs until it is fixed: %s",
                              delay, error)
                elif isinstance(error, BrokerRefusedError):
                    log.error("the broker refuses user %r, retrying in %.1fs until its "
                              "password or the broker's grants are fixed: %s",
                              self._settings.username, delay, error)
                else:
                    log.warning("broker unavailable, retrying in %.1fs: %s", delay, error)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(delay * 2, self._settings.reconnect_max_s)
        return True

    def disconnect(self) -> None:
        with self._lock:
            self._subscriptions.clear()
            self._teardown()

    def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        # A deliberate disconnect: the listener's on_disconnected must not cry wolf,
        # and acks for deliveries of the old connection become no-ops.
        self._generation += 1
        if conn is None:
            return
        # Wait for the DISCONNECT's receipt: the broker has then processed every frame
        # before it. Over TLS stomp.py only queues frames for its I/O thread, so an ack
        # (sent without a receipt) followed by a quick exit was lost: the message stayed.
        receipt = f"bye-{uuid.uuid4().hex[:8]}"
        waiter = threading.Event()
        live = conn.is_connected()
        if live:
            self._receipts[receipt] = waiter
        confirmed = False
        try:
            if live:
                # Not ``conn.disconnect(receipt=...)``: stomp.py then waits, without a
                # bound, for its I/O thread to end, and a broker that never answers
                # (frozen, or gone without closing the socket) kept a SIGTERMed
                # dispatcher alive until the kubelet's SIGKILL. Marked as the
                # DISCONNECT's receipt, its arrival still makes stomp.py's I/O thread
                # close the socket itself.
                conn.set_receipt(receipt, "DISCONNECT")
                conn.send_frame("DISCONNECT", {"receipt": receipt})
                confirmed = waiter.wait(DISCONNECT_RECEIPT_S)
                if not confirmed:
                    log.warning("no receipt for DISCONNECT within %.0f s; closing the "
                                "socket anyway", DISCONNECT_RECEIPT_S)
        except (stomp.exception.StompException, OSError) as error:
            log.debug("disconnect: %s", error)
        finally:
            self._receipts.pop(receipt, None)
            if not confirmed:
                _close_socket(conn)

    # -- callbacks from the listener thread ------------------------------------------

    def _on_disconnected(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._connected.clear()
        # Wake every sender waiting on a receipt that will never come.
        for receipt, waiter in list(self._receipts.items()):
            self._failed_receipts[receipt] = ""
            waiter.set()
        log.warning("lost the broker connection")


def _close_socket(conn: Any) -> None:
    """Close the socket, which ends stomp.py's I/O thread, without waiting long: over
    TLS the close is a shutdown handshake in blocking mode, which a frozen broker never
    answers. The closer is a daemon thread, so a process that exits does not wait."""

    def close() -> None:
        try:
            conn.transport.disconnect_socket()
        except (stomp.exception.StompException, OSError, AttributeError, ValueError) as error:
            # AttributeError/ValueError: the I/O thread tore the selector down first.
            log.debug("closing the broker socket: %s", error)

    closer = threading.Thread(target=close, name="stomp-close", daemon=True)
    closer.start()
    closer.join(DISCONNECT_RECEIPT_S)

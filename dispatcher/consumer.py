"""The STOMP side: N workers take deliveries off the subscription and settle them.

stomp.py calls us on its receiver thread; we only queue the frame there. A feeder
sorts deliveries into per-RB lanes (``lanes``) in the order the broker sent them, and
workers handle them on their own threads, one message of an RB at a time. Whether a
message is acked is decided in one place, ``_settle``, after the handling returned.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from autoreduce_common.stomp_client import BrokerError, Delivery, StompClient

from dispatcher.dispatch import Dispatcher, Received, TryLater, Verdict
from dispatcher.lanes import Lanes, lane_of

log = logging.getLogger(__name__)


class Consumer:
    def __init__(
        self,
        *,
        client: StompClient,
        dispatcher: Dispatcher,
        destination: str,
        workers: int,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 5.0,  # a held message is retried at least this often
    ) -> None:
        self._client = client
        self._dispatcher = dispatcher
        self._destination = destination
        self._workers = workers
        self._sink: queue.Queue[Delivery] = queue.Queue()
        self._lanes: Lanes[Delivery] = Lanes()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s

    def start(self) -> None:
        try:
            self._client.subscribe(
                destination=self._destination, sink=self._sink, prefetch=self._workers
            )
        except BrokerError as error:
            # Remembered all the same: the watchdog below reconnects and subscribes
            # again until the broker allows it, and readiness stays false meanwhile.
            log.error("cannot consume %s yet: %s", self._destination, error)
        feeder = threading.Thread(target=self._feed, name="lanes", daemon=True)
        feeder.start()
        self._threads.append(feeder)
        for index in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"dispatch-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        watchdog = threading.Thread(target=self._keep_connected, name="broker", daemon=True)
        watchdog.start()
        self._threads.append(watchdog)

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stop(self, *, timeout: float) -> None:
        """Stop taking work, let in-flight dispatches finish, then disconnect."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        # Unacked deliveries still queued here go back to the broker on disconnect.
        self._client.disconnect()

    def _keep_connected(self) -> None:
        while not self._stop.is_set():
            if not self._client.connected:
                self._client.ensure_connected(stop=self._stop)
            self._stop.wait(0.5)

    def _feed(self) -> None:
        while not self._stop.is_set():
            try:
                delivery = self._sink.get(timeout=0.5)
            except queue.Empty:
                continue
            fallback = delivery.headers.get("message-id") or delivery.ack_id
            self._lanes.put(lane_of(delivery.body, fallback=fallback), delivery)

    def _work(self) -> None:
        while not self._stop.is_set():
            taken = self._lanes.take(timeout=0.5)
            if taken is None:
                continue
            lane, delivery = taken
            try:
                self._process(delivery)
            finally:
                self._lanes.done(lane)

    def _process(self, delivery: Delivery) -> None:
        received = Received(body=delivery.body, headers=delivery.headers)
        delay = self._retry_initial_s
        verdict: Verdict | None = None
        bugs = 0
        while verdict is None and not self._stop.is_set():
            try:
                verdict = self._dispatcher.handle(received)
            except TryLater as error:
                if delivery.generation != self._client.generation:
                    log.info("connection changed; the message will be redelivered")
                    break
                log.warning("cannot dispatch yet (%s); retrying in %.1fs", error, delay)
            except Exception as error:
                # A bug, not bad input. Retry a little (it may be transient), then
                # park the message on the DLQ with the reason rather than block a
                # worker forever: it is kept there, never silently acked away.
                bugs += 1
                log.exception("unexpected error dispatching %s", delivery.headers.get("message-id"))
                if bugs >= 3:
                    verdict = self._dispatcher.park(received, f"dispatcher error: {error!r}")
                    break
            if verdict is None:
                self._stop.wait(delay)
                delay = min(delay * 2, self._retry_max_s)
        self._settle(delivery, verdict)

    def _settle(self, delivery: Delivery, verdict: Verdict | None) -> None:
        """The only place a delivery is acked: when the run is safe in the cluster."""
        if verdict is Verdict.ACK:
            if not self._client.ack(delivery):
                log.info("ack lost with its connection; the redelivery will meet 409")
            return
        log.info("message %s left unacked for redelivery", delivery.headers.get("message-id"))

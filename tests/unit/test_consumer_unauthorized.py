"""A 401 from the API keeps the message: never acked away, dead-lettered or reported.

The real ``Consumer`` and ``Dispatcher`` (and ``Controller``, not started) run over a
fake of our own ``Kube`` boundary that answers a 401 the way ``dispatcher.kube`` maps
it, and over an in-memory stand-in for our ``StompClient`` that records what it is
asked to ack and send. Before 401 was mapped, such a run was dead-lettered with a
ReductionError after three tries.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from autoreduce_common.broker_settings import QueueNames
from autoreduce_common.stomp_client import Delivery

from dispatcher.admission import Caps
from dispatcher.config import DispatcherSettings
from dispatcher.consumer import Consumer
from dispatcher.controller import Controller
from dispatcher.dispatch import Dispatcher
from dispatcher.identity import Labels
from dispatcher.kube import AlreadyExists
from dispatcher.kube.errors import _map_status
from dispatcher.manifests import load_template
from dispatcher.reporting import Reporter

Obj = dict[str, Any]
QUEUES = QueueNames()
REJECTED = b'{"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"}'
RUN = {
    "data": "/isis/NDXWISH/WISH00000001.nxs", "facility": "ISIS", "instrument": "WISH",
    "rb_number": 1234567, "run_number": 1, "run_version": 0, "reduction_script": "x",
    "reduction_arguments": {}, "started_by": 0,
}  # fmt: skip


class RejectingKube:
    """Answers 401 to the first ``rejections`` Job creates (an expired token), then
    works: what ``dispatcher.kube.Kube`` raises once re-reading did not help."""

    namespace = "ns"

    def __init__(self, rejections: int) -> None:
        self.rejections = rejections
        self.creates = 0
        self.objects: dict[str, Obj] = {}

    def create_job(self, body: Obj) -> Obj:
        self.creates += 1
        if self.creates <= self.rejections:
            raise _map_status(401, REJECTED, f"create Job {body['metadata']['name']}")
        return self._create(body)

    def create_config_map(self, body: Obj) -> Obj:
        return self._create(body)

    def _create(self, body: Obj) -> Obj:
        name = f"{body['kind']}/{body['metadata']['name']}"
        if name in self.objects:
            raise AlreadyExists(name, status=409)
        stored = {**body, "metadata": {**body["metadata"], "uid": name, "resourceVersion": "1"}}
        self.objects[name] = stored
        return stored


class MemoryBroker:
    """What the consumer and the reporter ask of a ``StompClient``, in memory."""

    connected = True
    generation = 1
    reconnects = 1

    def __init__(self, pending: list[bytes]) -> None:
        self.pending = pending
        self.acked: list[str] = []
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, *, destination: str, sink: queue.Queue[Delivery], prefetch: int) -> None:
        for index, body in enumerate(self.pending):
            sink.put(Delivery(body=body, headers={"message-id": f"ID:{index}"},
                              ack_id=f"ack-{index}", generation=self.generation))  # fmt: skip

    def ensure_connected(self, *, stop: threading.Event | None = None) -> bool:
        return True

    def ack(self, delivery: Delivery) -> bool:
        self.acked.append(delivery.ack_id)
        return True

    def send(self, *, destination: str, body: bytes, **_: Any) -> None:
        self.sent.append((destination, body))

    def disconnect(self) -> None:
        pass


def consumer_over(kube: RejectingKube, broker: MemoryBroker) -> Consumer:
    settings = DispatcherSettings.model_validate({})
    labels = Labels(settings.jobs.label_prefix)
    controller = Controller(kube=kube, labels=labels, identity="test", caps=Caps(None, {}),  # type: ignore[arg-type]
                            resync_seconds=300)  # fmt: skip
    dispatcher = Dispatcher(
        settings=settings, kube=kube, controller=controller,  # type: ignore[arg-type]
        reporter=Reporter(client=broker, queues=QUEUES),  # type: ignore[arg-type]
        template=load_template(settings.jobs.template_path),
    )  # fmt: skip
    return Consumer(client=broker, dispatcher=dispatcher, destination=QUEUES.pending,  # type: ignore[arg-type]
                    workers=1, retry_initial_s=0.001, retry_max_s=0.01)  # fmt: skip


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_401_outlasting_the_bug_retries_still_dispatches_the_run_once() -> None:
    kube = RejectingKube(rejections=10)  # far more than the three tries a bug gets
    broker = MemoryBroker([json.dumps(RUN).encode()])
    consumer = consumer_over(kube, broker)
    consumer.start()
    try:
        wait_until(lambda: bool(broker.acked))
    finally:
        consumer.stop(timeout=5)
    assert kube.creates == 11
    assert broker.acked == ["ack-0"]
    assert broker.sent == []  # no dead letter, no ReductionError
    assert sorted(name.split("/")[0] for name in kube.objects) == ["Job"]  # message inline


def test_a_persisting_401_leaves_the_message_unacked_and_never_dead_letters_it() -> None:
    kube = RejectingKube(rejections=10**9)
    broker = MemoryBroker([json.dumps(RUN).encode()])
    consumer = consumer_over(kube, broker)
    consumer.start()
    try:
        wait_until(lambda: kube.creates >= 20)
    finally:
        consumer.stop(timeout=5)
    assert broker.acked == []  # left for redelivery when the connection closes
    assert broker.sent == []
    assert kube.objects == {}

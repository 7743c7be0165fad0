"""The intake without the stack: the real ``Consumer`` and ``Dispatcher`` over a fake
of our own ``Kube`` and the in-memory transport. A redelivered run meets 409 and
becomes no second Job; both copies are acked; the RB's key is queued for admission."""

from __future__ import annotations

import json
import time

from dispatcher.caches import JobCache, PodCache
from dispatcher.config import DispatcherSettings
from dispatcher.consumer import Consumer
from dispatcher.dispatch import Dispatcher
from dispatcher.keys import Key, Kind
from dispatcher.manifests import load_template
from dispatcher.reporting import Reporter
from dispatcher.workqueue import WorkQueue
from tests.unit.daemon_harness import LABELS
from tests.unit.fake_kube import FakeKube
from tests.unit.memory_transport import MemoryTransport

RUN = {
    "data": "/isis/NDXWISH/WISH00000001.nxs", "facility": "ISIS", "instrument": "WISH",
    "rb_number": 1234567, "run_number": 1, "run_version": 0, "reduction_script": "x",
    "reduction_arguments": {}, "started_by": 0,
}  # fmt: skip


def test_a_redelivered_run_becomes_one_job_and_both_copies_are_acked() -> None:
    settings = DispatcherSettings.model_validate({})
    kube, queue = FakeKube(), WorkQueue()
    broker = MemoryTransport(pending=[json.dumps(RUN).encode()] * 2)
    dispatcher = Dispatcher(
        settings=settings, kube=kube, jobs=JobCache(LABELS), pods=PodCache(),  # type: ignore[arg-type]
        queue=queue, reporter=Reporter(client=broker, queues=settings.broker.queues),
        template=load_template(settings.jobs.template_path),
    )  # fmt: skip
    consumer = Consumer(client=broker, dispatcher=dispatcher,
                        destination=settings.broker.queues.pending, workers=1)
    consumer.start()
    try:
        deadline = time.monotonic() + 10
        while len(broker.acked) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        consumer.stop(timeout=5)
    assert broker.acked == ["ack-0", "ack-1"]
    assert len(kube.jobs) == 1 and len(kube.config_maps) == 1
    assert [w for w in kube.writes if w[0] == "create Job"] == [("create Job", *kube.jobs)]
    assert broker.sent == []  # nothing dead-lettered, nothing reported
    assert Key(Kind.RB, "1234567") in queue.pending()

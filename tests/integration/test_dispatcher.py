"""Dispatcher core on the real broker and the real API server (issue 4 acceptance)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.product import (
    SLEEPY_SCRIPT,
    DispatcherProcess,
    Facility,
    read_timeline,
    run_message,
    wait_until,
)
from devstack.queues import QueueReader
from dispatcher.config import DispatcherSettings
from dispatcher.identity import RunKey, job_name
from dispatcher.manifests import Arrival, load_template, render_job
from tests.conftest import needs_own_component
from tests.harness.checks import (  # noqa: F401 - re-exported for other tests
    SELECTOR,
    assert_exclusive,
    count_outcomes,
    outcomes,
    parse_time,
    send,
    stored_message,
)

pytestmark = pytest.mark.integration


def test_two_rbs_reduce_in_parallel_one_run_at_a_time_within_each(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    start_dispatcher()
    # Six runs each: a run after run is about 4 s of real pod on this node.
    for i in range(6):
        for rb, instrument, base in ((1100001, "WISH", 1000), (1100002, "LET", 2000)):
            send(stomp, broker_settings, run_message(
                facility=facility, instrument=instrument, rb=rb, run=base + i,
                script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 12), timeout=240)
    complete = outcomes(reader, broker_settings, "complete")
    assert len(complete) == 12, outcomes(reader, broker_settings, "error")
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert len(jobs) == 12
    by_rb = assert_exclusive(facility, jobs)
    assert set(by_rb) == {"1100001", "1100002"}
    # In parallel: the two RBs' busy periods overlap.
    (a_start, a_end), (b_start, b_end) = (
        (by_rb[rb][0][0], by_rb[rb][-1][1]) for rb in ("1100001", "1100002")
    )
    assert a_start < b_end and b_start < a_end
    # Each run of an RB in arrival order (same priority).
    order = [int(Path(e["file"]).stem[-8:]) for e in read_timeline(facility)
             if e["event"] == "start" and "WISH" in e["file"]]
    assert order == sorted(order)


def test_duplicate_and_redelivered_messages_give_one_job(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, kube: Any,
) -> None:
    message = run_message(facility=facility, instrument="WISH", rb=1200001, run=7,
                          script=SLEEPY_SCRIPT)
    # A previous dispatcher created the Job and died before acking: the message is
    # redelivered. We stand in for it by creating the same Job first (suspended),
    # rendered from the same settings, then start a dispatcher.
    proc = start_dispatcher(name="first")
    proc.kill(signal.SIGKILL)
    settings = DispatcherSettings.model_validate(proc.settings)
    key = RunKey(facility="ISIS", instrument="WISH", runs=(7,), version=0, rb_number="1200001")
    manifest = render_job(settings=settings, template=load_template(settings.jobs.template_path),
                          key=key, arrival=Arrival(priority=4, enqueued_ms=0, message_id="x"))
    batch.create_namespaced_job(namespace, manifest)
    start_dispatcher(name="second")
    send(stomp, broker_settings, message)
    send(stomp, broker_settings, message)
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=120)
    reader.settle(3)
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert [j.metadata.name for j in jobs] == [job_name(key)]


# Enough of the dispatcher's Role (helm/autoreduce/templates/rbac.yaml) to create a
# Job, but not its ConfigMap. Not kept in step with the chart: the test only needs a
# dispatcher that stops after the Job, and the healthy one uses the admin kubeconfig.
NO_CONFIGMAP_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["create", "get", "list", "update", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]


def test_a_small_message_travels_in_its_job_and_needs_no_config_map(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, kube: Any,
) -> None:
    start_dispatcher()
    message = run_message(facility=facility, instrument="WISH", rb=1200003, run=9,
                          script=SLEEPY_SCRIPT)
    send(stomp, broker_settings, message)
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=120)
    # The runner read the message from the Job's annotation (the downward API).
    (done,) = outcomes(reader, broker_settings, "complete")
    assert done["run_number"] == 9 and done["reduction_script"] == SLEEPY_SCRIPT
    name = job_name(RunKey("ISIS", "WISH", (9,), 0, "1200003"))
    core = k8s.CoreV1Api(kube.api_client())
    assert name not in [cm.metadata.name for cm in core.list_namespaced_config_map(
        namespace, label_selector=SELECTOR).items]
    assert stored_message(batch.api_client, namespace, name) == message


def test_dispatcher_killed_between_job_create_and_ack_gives_one_job_after_redelivery(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, kube: Any,
) -> None:
    # A real kill in the window, made wide on purpose: this dispatcher may create Jobs
    # but not ConfigMaps, so each run stops after its Job with the message unacked
    # (403 is a deployment fault: the message is kept). SIGKILL it there; the broker
    # redelivers to a healthy dispatcher, whose create meets 409 and completes the run.
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client())
    k8s.CoreV1Api(kube.api_client()).create_namespaced_service_account(
        namespace, {"metadata": {"name": "no-configmaps"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "no-configmaps"},
                                            "rules": NO_CONFIGMAP_RULES})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "no-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "no-configmaps"},
        "subjects": [{"kind": "ServiceAccount", "name": "no-configmaps",
                      "namespace": namespace}],
    })
    half = start_dispatcher(name="half", concurrency=1)
    half.kill(signal.SIGKILL)
    half.kubeconfig = kube.service_account_kubeconfig(namespace=namespace, name="no-configmaps")
    half.start()
    # Too large to travel in its Job (jobs.inline_message_max_bytes), so the run's
    # message needs its own ConfigMap.
    message = run_message(facility=facility, instrument="WISH", rb=1200002, run=8,
                          script=SLEEPY_SCRIPT + "\n#" + "x" * 20_000 + "\n")
    send(stomp, broker_settings, message)
    key = RunKey(facility="ISIS", instrument="WISH", runs=(8,), version=0, rb_number="1200002")
    core = k8s.CoreV1Api(kube.api_client())

    def job_without_config_map() -> bool:
        names = [j.metadata.name for j in batch.list_namespaced_job(
            namespace, label_selector=SELECTOR).items]
        return names == [job_name(key)] and "forbidden" in half.log().lower()

    wait_until(job_without_config_map, timeout=60, what="the Job, and the ConfigMap refused")
    assert not any(cm.metadata.name == job_name(key)
                   for cm in core.list_namespaced_config_map(namespace).items)
    half.kill(signal.SIGKILL)
    assert outcomes(reader, broker_settings, "complete") == []
    start_dispatcher(name="healthy")
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=120)
    reader.settle(3)
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [8]
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert [j.metadata.name for j in jobs] == [job_name(key)]
    config_map = core.read_namespaced_config_map(job_name(key), namespace)
    assert [o.name for o in config_map.metadata.owner_references] == [job_name(key)]


def test_killed_dispatcher_restarts_and_waiting_runs_still_reduce_in_order(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    first = start_dispatcher()
    for run in range(1, 6):
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=1300001, run=run, script=SLEEPY_SCRIPT))
    wait_until(lambda: len(batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)
               == 5, timeout=60, what="5 Jobs")
    first.kill(signal.SIGKILL)
    time.sleep(2)  # runs finish meanwhile: nobody admits the next one
    start_dispatcher(name="dispatcher-restarted")
    reader.wait_for(count_outcomes(broker_settings, 5), timeout=180)
    assert len(outcomes(reader, broker_settings, "complete")) == 5
    starts = [int(Path(e["file"]).stem[-8:]) for e in read_timeline(facility)
              if e["event"] == "start"]
    assert starts == [1, 2, 3, 4, 5]
    assert_exclusive(facility, batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)


def test_sigterm_mid_burst_drains_in_flight_dispatches_and_loses_nothing(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    # A rolling update sends SIGTERM while messages are arriving: whatever was being
    # dispatched finishes (or stays unacked for the next replica), exit code 0.
    first = start_dispatcher()
    runs = [(1700000 + rb, 10 * rb + i) for i in range(4) for rb in range(6)]
    for rb, run in runs[:8]:
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=rb, run=run, script=SLEEPY_SCRIPT))
    wait_until(lambda: len(batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)
               >= 2, timeout=60, what="the first Jobs")
    for rb, run in runs[8:]:
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=rb, run=run, script=SLEEPY_SCRIPT))
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0
    assert "SIGTERM: finishing in-flight dispatches" in first.log()
    start_dispatcher(name="dispatcher-after-term")
    reader.wait_for(count_outcomes(broker_settings, len(runs)), timeout=300)
    reader.settle(3)
    complete = sorted(m["run_number"] for m in outcomes(reader, broker_settings, "complete"))
    assert complete == sorted(run for _, run in runs)  # each run once, none lost
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert len(jobs) == len(runs)
    assert_exclusive(facility, jobs)


def test_sigterm_while_the_broker_is_frozen_still_exits_within_the_grace(
    start_dispatcher: Callable[..., DispatcherProcess], broker: Any,
) -> None:
    """The chart gives the pod 60 s after SIGTERM. A broker that does not answer must
    not hold the dispatcher past it: the kubelet's SIGKILL would cut the drain short."""
    if not hasattr(broker, "freeze"):
        needs_own_component("cannot freeze a broker this suite did not start")
    proc = start_dispatcher()
    assert proc.process is not None
    wait_until(lambda: " consuming " in proc.log(), timeout=60, what="the dispatcher consuming")
    broker.freeze()
    try:
        proc.process.send_signal(signal.SIGTERM)
        assert proc.process.wait(55) == 0, proc.log()[-2000:]
    finally:
        broker.thaw()
    assert "SIGTERM: finishing in-flight dispatches" in proc.log()


def test_two_dispatchers_keep_exclusivity(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    start_dispatcher(name="a")
    start_dispatcher(name="b")
    for i in range(5):
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=1400001, run=100 + i, script=SLEEPY_SCRIPT))
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="LET", rb=1400002, run=200 + i, script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 10), timeout=240)
    assert len(outcomes(reader, broker_settings, "complete")) == 10
    assert_exclusive(facility, batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)


def test_cancel_waiting_run_and_run_cancelled_before_it_arrives(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    start_dispatcher()
    slow = SLEEPY_SCRIPT.replace('"0.3"', '"3"')
    holder = run_message(facility=facility, instrument="WISH", rb=1500001, run=1, script=slow)
    waiting = run_message(facility=facility, instrument="WISH", rb=1500001, run=2,
                          script=SLEEPY_SCRIPT)
    send(stomp, broker_settings, holder)
    send(stomp, broker_settings, waiting)
    wait_until(lambda: len(batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)
               == 2, timeout=60, what="2 Jobs")
    send(stomp, broker_settings, {**waiting, "cancel": True})
    # A cancellation for run 3, before run 3 exists.
    early = run_message(facility=facility, instrument="WISH", rb=1500001, run=3,
                        script=SLEEPY_SCRIPT)
    send(stomp, broker_settings, {**early, "cancel": True})
    time.sleep(1)
    send(stomp, broker_settings, early)
    reader.wait_for(count_outcomes(broker_settings, 3), timeout=120)
    reader.settle(2)
    complete = outcomes(reader, broker_settings, "complete")
    errors = outcomes(reader, broker_settings, "error")
    assert [m["run_number"] for m in complete] == [1]
    assert sorted(m["run_number"] for m in errors) == [2, 3]
    assert all("ancel" in m["message"] for m in errors)
    # The early cancellation is kept as a suspended marker Job under the run's name,
    # outside the managed selector (never a run), so a resend of run 3 is dropped too,
    # silently: it has had its one outcome.
    markers = batch.list_namespaced_job(namespace, label_selector="autoreduce.io/cancel=true")
    assert [(j.metadata.labels["autoreduce.io/run-number"], j.spec.suspend)
            for j in markers.items] == [("3", True)]
    managed = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert all(j.metadata.labels.get("autoreduce.io/run-number") != "3" for j in managed)
    send(stomp, broker_settings, early)
    reader.settle(3)
    assert sorted(m["run_number"] for m in outcomes(reader, broker_settings, "error")) == [2, 3]
    starts = [e for e in read_timeline(facility) if e["event"] == "start"]
    assert len(starts) == 1  # neither cancelled run ever ran


def test_cancel_markers_expire_and_a_late_run_is_then_reduced(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    # Suspended markers never reach a TTL: the dispatcher's sweep removes them.
    start_dispatcher(jobs={"cancel_marker_ttl_seconds": 3})
    late = run_message(facility=facility, instrument="WISH", rb=1500002, run=4,
                       script=SLEEPY_SCRIPT)
    send(stomp, broker_settings, {**late, "cancel": True})

    def markers() -> list[Any]:
        found = batch.list_namespaced_job(namespace, label_selector="autoreduce.io/cancel=true")
        return list(found.items)

    wait_until(lambda: len(markers()) == 1, timeout=30, what="the cancel marker")
    wait_until(lambda: not markers(), timeout=60, what="the marker's expiry")
    send(stomp, broker_settings, late)
    reader.wait_for(lambda seen: any(d.destination == broker_settings.queues.complete
                                     for d in seen), timeout=120)
    reader.settle(2)
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [4]
    assert outcomes(reader, broker_settings, "error") == []


BAD_BODIES = [
    (b"this is not json", "not JSON", False),
    (b"[1, 2, 3]", "not an object", False),
    (json.dumps({"instrument": "WISH", "run_number": 5}).encode(), "missing required", True),
    (json.dumps({"data": "/isis/x", "instrument": "WISH", "rb_number": "12\n34",
                 "run_number": 5, "reduction_script": "x", "reduction_arguments": {}}).encode(),
     "rb_number", True),
    (json.dumps({"data": "/isis/x", "instrument": "WI SH", "rb_number": 1,
                 "run_number": 5, "reduction_script": "x", "reduction_arguments": {}}).encode(),
     "instrument", True),
    (json.dumps({"data": "/isis/x", "instrument": "WISH", "rb_number": 1, "run_number": 6,
                 "reduction_script": "#" * 1_100_000, "reduction_arguments": {}}).encode(),
     "at most", True),
]


def test_bad_input_is_dead_lettered_with_a_reason_and_the_line_keeps_moving(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
) -> None:
    dispatcher = start_dispatcher()
    for body, _, _ in BAD_BODIES:
        send(stomp, broker_settings, body)
    # The good run is large but under the limit (900 KB of script): it must travel
    # through its ConfigMap and reduce, while the 1.1 MB one above is refused.
    good = run_message(facility=facility, instrument="WISH", rb=1600001, run=9,
                       script=SLEEPY_SCRIPT + "\n#" + "x" * 900_000 + "\n")
    send(stomp, broker_settings, good)
    dlq = broker_settings.queues.dead_letter
    reader.wait_for(lambda seen: sum(d.destination == dlq for d in seen) >= len(BAD_BODIES)
                    and count_outcomes(broker_settings, 1)(seen) and any(
                        d.destination == broker_settings.queues.complete for d in seen),
                    timeout=120)
    dead = {d.body: d for d in reader.seen if d.destination == dlq}
    for body, fragment, _ in BAD_BODIES:
        assert body in dead  # the original, untouched
        assert fragment in dead[body].headers["autoreduce-reason"], dead[body].headers
    errors = outcomes(reader, broker_settings, "error")
    assert len(errors) == sum(1 for *_, identifiable in BAD_BODIES if identifiable)
    assert dispatcher.alive()


def test_lease_held_by_a_job_that_no_longer_exists_is_reclaimed(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, kube: Any,
) -> None:
    coordination = k8s.CoordinationV1Api(kube.api_client())
    coordination.create_namespaced_lease(namespace, {
        "metadata": {"name": "rb-1700001",
                     "labels": {"autoreduce.io/managed": "true",
                                "autoreduce.io/rb-number": "1700001"}},
        "spec": {"holderIdentity": "red-wish-1-v0-gone0000"},
    })
    start_dispatcher()
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=1700001,
                                             run=77, script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=90)
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [77]

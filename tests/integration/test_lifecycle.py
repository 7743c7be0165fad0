"""Every run ends in exactly one outcome; retries, cancelling running work, caps, HA
(issue 5 acceptance), on the real broker, API server and a real node."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.activemq import free_port
from devstack.product import (
    SLEEPY_SCRIPT,
    DispatcherProcess,
    Facility,
    read_timeline,
    run_message,
    wait_until,
)
from devstack.queues import QueueReader
from dispatcher.identity import RunKey, job_name
from tests.harness.checks import (
    SELECTOR,
    assert_exclusive,
    count_outcomes,
    http_status,
    outcomes,
    send,
)
from tests.harness.cli import as_json, cli
from tests.harness.pods import evict, kill_runner_when_running

pytestmark = pytest.mark.integration

HUNGRY_SCRIPT = """
def main(input_file, output_dir):
    block = bytearray(600 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
"""
# The test kills the runner's container once this line is in the pod log.
KILLER_SCRIPT = """
import time
def main(input_file, output_dir):
    print("taking the runner down with me", flush=True)
    time.sleep(120)
"""
LONG_SCRIPT = SLEEPY_SCRIPT.replace('"0.3"', '"60"')


def errors_for(reader: QueueReader, settings: BrokerSettings, run: int) -> list[dict[str, Any]]:
    return [m for m in outcomes(reader, settings, "error") if m["run_number"] == run]


def name_of(instrument: str, rb: int, run: int, version: int = 0) -> str:
    return job_name(RunKey("ISIS", instrument, (run,), version, str(rb)))


def dispatcher_events(kube: Any, namespace: str, job: str) -> list[tuple[str, str, str]]:
    """(reason, type, note) of the dispatcher's Events on Job ``job``, oldest first, as
    the API server holds them (they outlive a deleted Job)."""
    # kubectl, not the Python client: it cannot parse the Job controller's Events.
    out = kube.kubectl("get", "events.events.k8s.io", "-n", namespace, "-o", "json",
                       "--field-selector", f"regarding.name={job}")
    ours = [e for e in json.loads(out.stdout)["items"]
            if e.get("reportingController") == "autoreduce.io/dispatcher"]
    ours.sort(key=lambda e: e["eventTime"])
    return [(e["reason"], e["type"], e["note"]) for e in ours]


def event_of(kube: Any, namespace: str, job: str, reason: str) -> tuple[str, str]:
    """(type, note) of the dispatcher's Event ``reason`` on ``job``, once it is there."""
    found = wait_until(lambda: [(kind, note) for r, kind, note
                                in dispatcher_events(kube, namespace, job) if r == reason],
                       timeout=30, what=f"a {reason} Event on {job}")
    assert len(found) == 1, found
    return tuple(found[0])


def cgroup_v2() -> bool:
    """The node's cgroup version decides who reports an OOM (the stack's node runs here)."""
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()


def running_pod(core: k8s.CoreV1Api, namespace: str) -> str | None:
    for pod in core.list_namespaced_pod(namespace, label_selector=SELECTOR).items:
        if pod.status.phase == "Running":
            return str(pod.metadata.name)
    return None


def test_silent_deaths_each_get_one_error_with_the_reason_and_free_the_rb(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    start_dispatcher(
        instruments={
            "OOM": {"resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                  "limits": {"memory": "200Mi"}}},
            "SLOW": {"active_deadline_seconds": 4},
        },
        retries={"mode": "dispatcher", "max_attempts": 1},
    )
    cases = [("OOM", HUNGRY_SCRIPT, "out of memory (limit 200Mi)", "OOMKilled"),
             ("SLOW", LONG_SCRIPT, "time limit of 4 s", "DeadlineExceeded"),
             ("CRASH", KILLER_SCRIPT, "exited with code 137", "ExitCode137")]
    for index, (instrument, script, _, _) in enumerate(cases):
        rb = 2100000 + index
        send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                 rb=rb, run=10 + index, script=script))
        # A second run of the same RB must start once the first one died.
        send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                 rb=rb, run=20 + index, script=SLEEPY_SCRIPT))
    kill_runner_when_running(kube, namespace, instrument="CRASH", log_line="taking the runner")
    reader.wait_for(count_outcomes(broker_settings, 6), timeout=180)
    reader.settle(5)
    for index, (instrument, _, fragment, reason) in enumerate(cases):
        errors = errors_for(reader, broker_settings, 10 + index)
        assert len(errors) == 1, errors
        assert fragment in errors[0]["message"], errors[0]["message"]
        # `kubectl describe job` says who posted the error and why.
        job = name_of(instrument, 2100000 + index, 10 + index)
        if instrument == "OOM" and not cgroup_v2():
            # cgroup v1: the kubelet has the kernel kill only the script's process, so
            # the runner survives and says it ran out of memory itself; no on-behalf.
            reader.settle(2)
            assert "OutcomePosted" not in [r for r, _, _ in
                                           dispatcher_events(kube, namespace, job)]
            continue
        assert event_of(kube, namespace, job, "OutcomePosted") == (
            "Warning", f"ReductionError on the run's behalf: {reason}")
    # The crashed runner's last words, read from the pod log, are in the error.
    (crash,) = errors_for(reader, broker_settings, 12)
    assert "last lines of its log:\n" in crash["message"], crash["message"]
    assert "taking the runner down with me" in crash["message"], crash["message"]
    complete = sorted(m["run_number"] for m in outcomes(reader, broker_settings, "complete"))
    assert complete == [20, 21, 22]


RAISING_SCRIPT = """
def main(input_file, output_dir):
    raise ValueError("this input is bad on purpose")
"""


def test_a_restarted_dispatcher_does_not_judge_again_a_run_whose_runner_posted(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    # The script raises: the runner posts its own ReductionError and exits 1, so the
    # Job fails, and the dispatcher lets the pod go once it has read that the runner
    # posted. Then the pod is deleted (a drain, an API eviction, a Job deadline, an
    # operator). A dispatcher started later re-lists every finished Job: it must find
    # this one settled on the Job itself, not judge a Job without pods and post a
    # second outcome (it did: the fault suite saw Complete + Error).
    retries = {"mode": "dispatcher", "max_attempts": 2, "delay_s": 1}
    first = start_dispatcher(retries=retries)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                             rb=2400001, run=61, script=RAISING_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=120)
    core = k8s.CoreV1Api(kube.api_client())
    pod = wait_until(lambda: next((p for p in core.list_namespaced_pod(
        namespace, label_selector=SELECTOR).items if not p.metadata.finalizers), None),
        timeout=60, what="the dispatcher to let the run's pod go")
    core.delete_namespaced_pod(pod.metadata.name, namespace)
    wait_until(lambda: not core.list_namespaced_pod(namespace, label_selector=SELECTOR).items,
               timeout=60, what="the deleted pod to go")
    job = k8s.BatchV1Api(kube.api_client()).read_namespaced_job(
        name_of("WISH", 2400001, 61), namespace)
    assert job.metadata.annotations["autoreduce.io/outcome"] == "Done", job.metadata
    first.kill()
    successor = start_dispatcher(name="successor", retries=retries)
    wait_until(lambda: "consuming" in successor.log(), timeout=60,
               what="the successor to start")
    reader.settle(10)
    (error,) = errors_for(reader, broker_settings, 61)
    assert "this input is bad on purpose" in error["message"], error
    assert not outcomes(reader, broker_settings, "complete")


def unschedulable_pod(core: k8s.CoreV1Api, namespace: str) -> str | None:
    """A runner pod the scheduler has marked Unschedulable (the autoscaler's signal)."""
    for pod in core.list_namespaced_pod(namespace, label_selector=SELECTOR).items:
        for condition in pod.status.conditions or []:
            if (condition.type, condition.status, condition.reason) == (
                    "PodScheduled", "False", "Unschedulable"):
                return str(pod.metadata.name)
    return None


def test_time_waiting_for_a_node_does_not_count_against_the_time_limit(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    # The run's pod waits Unschedulable (its node selector matches no node yet) for
    # longer than its 8 s limit, as pods do in a busy cycle until the autoscaler adds
    # a node; once a node fits it, the reduction runs whole. The limit is the pod's,
    # counted from when it reaches a node; a Job-level deadline would have failed it.
    label = "autoreduce.io/test-late-node"
    start_dispatcher(instruments={"LATE": {"node_selector": {label: "yes"},
                                           "active_deadline_seconds": 8}},
                     retries={"mode": "dispatcher", "max_attempts": 1})
    send(stomp, broker_settings, run_message(facility=facility, instrument="LATE",
                                             rb=2300001, run=41, script=SLEEPY_SCRIPT))
    core = k8s.CoreV1Api(kube.api_client())
    wait_until(lambda: unschedulable_pod(core, namespace), timeout=60,
               what="the run's pod to wait Unschedulable")
    time.sleep(12)  # past its time limit, still waiting for a node
    node = core.list_node().items[0].metadata.name
    core.patch_node(node, {"metadata": {"labels": {label: "yes"}}})
    try:
        reader.wait_for(count_outcomes(broker_settings, 1), timeout=120)
        reader.settle(3)
    finally:
        core.patch_node(node, {"metadata": {"labels": {label: None}}})
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [41]
    assert not errors_for(reader, broker_settings, 41)


# The first version outlives the kubelet's eviction (within 15 s); the retry, a new
# version with its own output folder, ends at once.
EVICTED_THEN_QUICK = SLEEPY_SCRIPT.replace(
    'float(os.environ.get("SLEEP", "0.3"))',
    '0.3 if output_dir.rstrip("/").endswith("run-version-1") else 30')


def test_evicted_run_is_reported_once_and_retried_as_the_next_version(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    start_dispatcher(retries={"mode": "dispatcher", "max_attempts": 2, "delay_s": 1})
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=2200001,
                                             run=31, script=EVICTED_THEN_QUICK))
    core = k8s.CoreV1Api(kube.api_client())
    pod = wait_until(lambda: running_pod(core, namespace), timeout=60,
                     what="a running runner pod")
    time.sleep(1)
    # The kubelet evicts within its volume-stats and eviction-manager periods
    # (5 s + 10 s here), well before the 30 s script ends; the retry then runs whole.
    evict(kube, core.read_namespaced_pod(pod, namespace))
    reader.wait_for(lambda seen: bool(outcomes(reader, broker_settings, "complete")),
                    timeout=180)
    reader.settle(3)
    errors = errors_for(reader, broker_settings, 31)
    assert len(errors) == 1 and "evicted" in errors[0]["message"], errors
    assert errors[0]["run_version"] == 0
    assert errors[0].get("retry_in") is None  # we retry: the web app must not as well
    (complete,) = outcomes(reader, broker_settings, "complete")
    assert complete["run_version"] == 1  # the retry, as a new version
    first = name_of("WISH", 2200001, 31)
    assert event_of(kube, namespace, first, "OutcomePosted") == (
        "Warning", "ReductionError on the run's behalf: Evicted")
    assert event_of(kube, namespace, first, "RetryScheduled") == (
        "Normal", "retry as version 1 in 1 s (attempt 2 of 2)")


def test_a_run_out_of_memory_is_retried_bigger_and_completes(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str, batch: k8s.BatchV1Api,
) -> None:
    """oom_retry on the real node: the 600 MiB script is killed under a 300Mi limit,
    its error says what is tried next, and version 1 gets 750Mi and completes. The
    operator's status shows version 0 as the error it posted (out of memory), not as
    the Job's own BackoffLimitExceeded."""
    proc = start_dispatcher(
        instruments={"OOMB": {
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          "limits": {"memory": "300Mi"}},
            "oom_retry": {"factor": 2.5, "max_memory": "1Gi"}}},
        retries={"mode": "dispatcher", "max_attempts": 3, "delay_s": 300},
    )  # fmt: skip
    send(stomp, broker_settings, run_message(facility=facility, instrument="OOMB", rb=2150001,
                                             run=15, script=HUNGRY_SCRIPT))
    reader.wait_for(lambda seen: bool(outcomes(reader, broker_settings, "complete")),
                    timeout=180)  # not the 300 s retry delay: at once
    reader.settle(3)
    (error,) = errors_for(reader, broker_settings, 15)
    assert error["run_version"] == 0
    assert error["message"] == (
        "Reduction ran out of memory (limit 300Mi) and was killed; it is retried as its "
        "next version with a memory limit of 750Mi"), error["message"]
    (complete,) = outcomes(reader, broker_settings, "complete")
    assert complete["run_version"] == 1
    retried = batch.read_namespaced_job(name_of("OOMB", 2150001, 15, version=1), namespace)
    runner = retried.spec.template.spec.containers[0]
    assert runner.resources.limits["memory"] == "750Mi"
    assert runner.resources.requests["memory"] == "160Mi"
    assert event_of(kube, namespace, name_of("OOMB", 2150001, 15), "RetryScheduled") == (
        "Normal", "retry as version 1 in 0 s (attempt 2 of 3) with a memory limit of 750Mi")
    v0 = name_of("OOMB", 2150001, 15)

    def v0_finished() -> dict[str, Any] | None:
        rows = as_json(cli(proc, "status", "--instrument", "oomb", "-o", "json"))["finished"]
        return next((row for row in rows if row["job"] == v0), None)

    row = wait_until(v0_finished, timeout=60, what="version 0 finished in status")
    assert row["outcome"] == "Error", row
    assert row["detail"].startswith("Reduction ran out of memory (limit 300Mi)"), row


def test_retry_in_is_honoured_bounded_and_survives_a_dispatcher_restart(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    settings = {"retries": {"mode": "dispatcher", "max_attempts": 3},
                "runner": {"env": {"AUTOREDUCE_PERMISSION_RETRY_S": "4"}}}
    first = start_dispatcher(name="first", **settings)
    facility.output.chmod(0o555)  # the runner's output checks fail: retry_in=4
    try:
        send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                                 rb=2300001, run=41, script=SLEEPY_SCRIPT))
        reader.wait_for(lambda seen: len(errors_for(reader, broker_settings, 41)) >= 1,
                        timeout=60)
        first_error_at = time.monotonic()
        first.kill(signal.SIGKILL)  # the retry is held by the broker, not by us
        start_dispatcher(name="second", **settings)
        reader.wait_for(lambda seen: len(errors_for(reader, broker_settings, 41)) >= 3,
                        timeout=120)
        second_gap = time.monotonic() - first_error_at
        reader.settle(8)  # max_attempts=3: no fourth attempt
    finally:
        facility.output.chmod(0o777)
    errors = errors_for(reader, broker_settings, 41)
    assert [e["run_version"] for e in errors] == [0, 1, 2]
    assert all(e["retry_in"] == 4 for e in errors)
    assert second_gap >= 8  # two delays of 4 s each
    # (v0's Event may be written twice: the first dispatcher can die after writing it)
    assert event_of(kube, namespace, name_of("WISH", 2300001, 41, 1), "RetryScheduled") == (
        "Normal", "retry as version 2 in 4 s (attempt 3 of 3)")
    last = name_of("WISH", 2300001, 41, 2)
    assert event_of(kube, namespace, last, "RetriesExhausted") == (
        "Warning", "attempt 3 of 3: not retried")
    assert "RetryScheduled" not in [r for r, _, _ in dispatcher_events(kube, namespace, last)]


def test_upstream_retries_report_retry_in_and_never_resubmit(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str, batch: k8s.BatchV1Api,
) -> None:
    # retries.mode upstream: transient failures are only reported, with retry_in, and
    # the web app decides (as the legacy system did). Both kinds of transient failure:
    # one the dispatcher reports (an eviction) and one the runner reports (retry_in).
    start_dispatcher(retries={"mode": "upstream", "max_attempts": 3, "delay_s": 2},
                     runner={"env": {"AUTOREDUCE_PERMISSION_RETRY_S": "3"}})
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=2800001,
                                             run=81, script=LONG_SCRIPT))
    wait_until(lambda: any(e["event"] == "start" for e in read_timeline(facility)),
               timeout=60, what="run 81 to start")
    core = k8s.CoreV1Api(kube.api_client())
    pod = wait_until(lambda: running_pod(core, namespace), timeout=30, what="run 81's pod")
    # From now on the runner cannot create an instrument's output folder: run 82 (of
    # another instrument than 81, whose folder exists) fails its checks with retry_in=3.
    facility.output.chmod(0o555)
    try:
        send(stomp, broker_settings, run_message(facility=facility, instrument="LET",
                                                 rb=2800002, run=82, script=SLEEPY_SCRIPT))
        evict(kube, core.read_namespaced_pod(pod, namespace))
        reader.wait_for(count_outcomes(broker_settings, 2), timeout=90)
        reader.settle(8)  # past both delays: nothing is resubmitted
    finally:
        facility.output.chmod(0o777)
    (evicted,) = errors_for(reader, broker_settings, 81)
    assert "evicted" in evicted["message"] and evicted["retry_in"] == 2, evicted
    (refused,) = errors_for(reader, broker_settings, 82)
    assert refused["retry_in"] == 3, refused
    assert (evicted["run_version"], refused["run_version"]) == (0, 0)
    assert not outcomes(reader, broker_settings, "complete")
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert sorted(j.metadata.name for j in jobs) == sorted(
        [name_of("WISH", 2800001, 81), name_of("LET", 2800002, 82)])
    for job in (name_of("WISH", 2800001, 81), name_of("LET", 2800002, 82)):
        reasons = [r for r, _, _ in dispatcher_events(kube, namespace, job)]
        assert "RetryScheduled" not in reasons and "RetriesExhausted" not in reasons, reasons
    assert event_of(kube, namespace, name_of("WISH", 2800001, 81), "OutcomePosted") == (
        "Warning", "ReductionError on the run's behalf: Evicted")


def test_cancelling_a_running_run_stops_it_and_frees_the_rb(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, kube: Any,
) -> None:
    start_dispatcher()
    running = run_message(facility=facility, instrument="WISH", rb=2400001, run=51,
                          script=LONG_SCRIPT)
    send(stomp, broker_settings, running)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=2400001,
                                             run=52, script=SLEEPY_SCRIPT))
    wait_until(lambda: any(e["event"] == "start" for e in read_timeline(facility)),
               timeout=60, what="run 51 to start")
    cancelled_at = time.monotonic()
    send(stomp, broker_settings, {**running, "cancel": True})
    reader.wait_for(lambda seen: bool(outcomes(reader, broker_settings, "complete")), timeout=60)
    assert time.monotonic() - cancelled_at < 45  # long before run 51's 60 s were up
    reader.settle(3)
    errors = errors_for(reader, broker_settings, 51)
    assert len(errors) == 1 and "cancelled while reducing" in errors[0]["message"]
    ends = [e for e in read_timeline(facility) if e["event"] == "end" and "51" in e["file"]]
    assert not ends  # its process was stopped, not allowed to finish
    names = [j.metadata.name for j in batch.list_namespaced_job(namespace,
                                                                label_selector=SELECTOR).items]
    assert not any("-51-" in name for name in names)
    # The Job is gone; its story is not. The cancel stopped the pod; once it had
    # stopped, the outcome path posted the error (the runner had not begun to send one).
    cancelled = name_of("WISH", 2400001, 51)
    assert event_of(kube, namespace, cancelled, "Cancelled") == (
        "Normal", "Run cancelled while reducing: stopping its pod")
    assert event_of(kube, namespace, cancelled, "OutcomePosted") == (
        "Warning", "ReductionError on the run's behalf: Cancelled")


def test_global_cap_bounds_running_reductions(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
) -> None:
    start_dispatcher(caps={"max_running": 2})
    for index in range(10):
        send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                                 rb=2500000 + index, run=600 + index,
                                                 script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 10), timeout=180)
    assert len(outcomes(reader, broker_settings, "complete")) == 10
    events = sorted((e["t"], 1 if e["event"] == "start" else -1) for e in read_timeline(facility))
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        level += step
        peak = max(peak, level)
    assert peak <= 2, f"{peak} reductions ran at once with a cap of 2"


def test_instrument_cap_holds_that_instrument_back_but_not_the_others(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    start_dispatcher(instruments={"MAPS": {"max_running": 1}})
    script = SLEEPY_SCRIPT.replace('"0.3"', '"5"')
    for instrument, rb, run in (("MAPS", 2510001, 901), ("MAPS", 2510002, 902),
                                ("LET", 2510003, 903)):  # three RBs: none waits for its RB
        send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                 rb=rb, run=run, script=script))
    reader.wait_for(count_outcomes(broker_settings, 3), timeout=120)
    assert len(outcomes(reader, broker_settings, "complete")) == 3
    spans: dict[int, list[float]] = {}
    for event in read_timeline(facility):
        spans.setdefault(int(Path(event["file"]).stem[-8:]), []).append(event["t"])
    (first, first_end), (second, _) = sorted(
        (min(spans[run]), max(spans[run])) for run in (901, 902))
    let_start, let_end = min(spans[903]), max(spans[903])
    assert second >= first_end, "two MAPS runs reduced at once with an instrument cap of 1"
    assert let_start < first_end and first < let_end, (
        f"LET ({let_start}-{let_end}) did not run beside MAPS ({first}-{first_end})")
    # The MAPS run that went second was told why it waited.
    later = 901 if min(spans[901]) == second else 902
    held = name_of("MAPS", 2510001 + later - 901, later)
    reasons = dispatcher_events(kube, namespace, held)
    assert [(r, note) for r, _, note in reasons] == [
        ("Waiting", "waiting for a slot: 1 MAPS runs reducing (instrument cap 1)"),
        ("Admitted", f"RB {2510001 + later - 901} is free: reducing"),
    ], reasons


@pytest.mark.timeout(900)
def test_two_replicas_with_one_killed_every_few_seconds(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, request: pytest.FixtureRequest,
) -> None:
    # Every run is a real pod on the one 2-core node (about 1.3 s each): 60 runs give
    # some 20 kills in about a minute and a half; --long runs the 200 of before.
    runs = 200 if request.config.getoption("--long") else 60
    replicas = [start_dispatcher(name="replica-a"), start_dispatcher(name="replica-b")]
    stop = threading.Event()
    kills = Counter[str]()

    def chaos() -> None:
        rng = random.Random(7)
        while not stop.wait(rng.uniform(2, 5)):
            victim = replicas[rng.randrange(2)]
            victim.kill(signal.SIGKILL)
            kills[victim.name] += 1
            victim.start()

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    try:
        for index in range(runs):
            send(stomp, broker_settings, run_message(
                facility=facility, instrument="WISH", rb=2600000 + index % 20,
                run=10_000 + index, script=SLEEPY_SCRIPT.replace('"0.3"', '"0.05"')))
        reader.wait_for(count_outcomes(broker_settings, runs), timeout=600)
    finally:
        stop.set()
        killer.join()
    reader.settle(5)
    finals = [*outcomes(reader, broker_settings, "complete"),
              *outcomes(reader, broker_settings, "error")]
    per_run = Counter(m["run_number"] for m in finals)
    assert len(per_run) == runs and set(per_run.values()) == {1}, per_run.most_common(3)
    jobs = batch.list_namespaced_job(namespace, label_selector=SELECTOR).items
    assert len(jobs) == runs
    assert_exclusive(facility, jobs)
    assert sum(kills.values()) >= 3
    print(f"kills: {dict(kills)}; outcomes: {len(finals)}; jobs: {len(jobs)}")
    Path(facility.root / "ha.json").write_text(json.dumps({"kills": dict(kills)}))


def test_image_that_cannot_be_pulled_is_reported_after_the_grace_and_frees_the_rb(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    start_dispatcher(image_pull_grace_s=3,
                     instruments={"GHOST": {"image": "registry.invalid/no-such-image:1"}})
    send(stomp, broker_settings, run_message(facility=facility, instrument="GHOST", rb=2700001,
                                             run=71, script=SLEEPY_SCRIPT))
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=2700001,
                                             run=72, script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 2), timeout=120)
    reader.settle(3)
    errors = errors_for(reader, broker_settings, 71)
    assert len(errors) == 1 and "could not start" in errors[0]["message"], errors
    assert "ImagePullBackOff" in errors[0]["message"] or "ErrImagePull" in errors[0]["message"]
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [72]


def test_health_endpoints_follow_the_broker_and_sigterm_exits_cleanly(
    start_dispatcher: Callable[..., DispatcherProcess], broker: Any,
    broker_settings: BrokerSettings,
) -> None:
    port = free_port()
    proc = start_dispatcher(http_port=port)

    def status(path: str) -> int:
        return http_status(port, path)

    wait_until(lambda: status("/readyz") == 200, timeout=60, what="ready")
    assert status("/healthz") == 200
    broker.stop(sig=signal.SIGKILL)
    try:
        wait_until(lambda: status("/readyz") == 503, timeout=60, what="not ready without broker")
        assert status("/healthz") == 200  # alive: restarting us would not bring the broker back
    finally:
        broker.start()
    wait_until(lambda: status("/readyz") == 200, timeout=90, what="ready again after reconnect")
    assert proc.process is not None
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(60) == 0
    assert "SIGTERM: finishing in-flight dispatches" in proc.log()

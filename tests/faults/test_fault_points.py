"""Stopping the runner, and the dispatcher, at each step of posting an outcome
(issue 15): whatever the instant, a run gets one outcome kind, and every copy of it
carries the same identity header; a copy that may repeat an earlier one says so.

The runner and the dispatcher have named fault points (``autoreduce_runner/faults.py``,
``dispatcher/faults.py``), off unless a test sets them. The real broker, API server and
node run everything; nothing here is mocked.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.pod_contract import OUTCOME_ID_HEADER, POSSIBLE_REPEAT_HEADER
from autoreduce_common.stomp_client import Delivery, StompClient
from kubernetes import client as k8s

from devstack.product import (
    DispatcherProcess,
    Facility,
    read_timeline,
    run_message,
    wait_until,
)
from devstack.queues import QueueReader
from dispatcher.admission import is_finished
from dispatcher.identity import Labels, RunKey, job_name
from tests.faults.support import PodRecorder, list_jobs, timeline_script
from tests.harness.checks import SELECTOR, exclusivity_violations, send
from tests.harness.pods import evict, kill_container, kill_runner_when_running

pytestmark = pytest.mark.integration

DONE_SCRIPT = """
import os
def main(input_file, output_dir):
    with open(os.path.join(output_dir, "reduced.txt"), "w") as out:
        out.write("reduced")
"""
# Exits 137 in the middle of a normal run: the dispatcher reports on the run's behalf.
# The test kills the runner's container once this has started (tests/harness/pods.py).
CRASH_SCRIPT = """
import time
def main(input_file, output_dir):
    print("waiting to be killed", flush=True)
    time.sleep(120)
"""
RETRIES_OFF = {"mode": "dispatcher", "max_attempts": 1}


def finals(reader: QueueReader, settings: BrokerSettings) -> list[Delivery]:
    q = settings.queues
    return [d for d in reader.seen if d.destination in (q.complete, q.error, q.skipped)]


def settle(reader: QueueReader, settings: BrokerSettings, *, at_least: int, kube: Any,
           namespace: str, timeout: float = 120) -> list[Delivery]:
    """The outcomes once nothing more can come: every Job finished and every pod stopped
    and let go by the dispatcher (it removes its finalizer as the last step of settling
    an outcome), plus a moment for a copy still on its way through the broker."""
    reader.wait_for(lambda _: len(finals(reader, settings)) >= at_least, timeout=timeout)
    wait_until(lambda: _all_settled(kube, namespace), timeout=timeout,
               what="every run's outcome to be settled")
    reader.settle(2)
    return finals(reader, settings)


FINALIZER = Labels("autoreduce.io").pod_finalizer


def _all_settled(kube: Any, namespace: str) -> bool:
    if not all(is_finished(job) for job in list_jobs(kube, namespace)):
        return False
    with kube.api_client() as api:
        pods = k8s.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=SELECTOR).items
    return all(pod.status.phase in ("Succeeded", "Failed")
               and FINALIZER not in (pod.metadata.finalizers or [])
               and _containers_stopped(pod) for pod in pods)


def _containers_stopped(pod: Any) -> bool:
    # The kubelet can report an evicted pod Failed before its container's own
    # terminated state (its real finish time, which the exclusivity judge reads).
    return all(status.state.terminated is not None
               for status in pod.status.container_statuses or [])


def job_of(run: int, rb: int) -> str:
    return job_name(RunKey("ISIS", "WISH", (run,), 0, str(rb)))


def one_kind_one_identity(seen: list[Delivery], *, job: str) -> str:
    """The single outcome kind of ``seen``; each copy has ``job`` as its identity and
    every copy after the first is marked as a possible repeat."""
    kinds = {d.destination.rsplit("/", 1)[-1].split(".")[0] for d in seen}
    assert len(kinds) == 1, f"contradictory outcomes: {[(d.destination, d.body) for d in seen]}"
    assert {d.headers.get(OUTCOME_ID_HEADER) for d in seen} == {job}, [d.headers for d in seen]
    for later in seen[1:]:
        assert later.headers.get(POSSIBLE_REPEAT_HEADER) == "true", later.headers
    return kinds.pop()


def runner_env(point: str, action: str = "exit") -> dict[str, Any]:
    return {"env": {"AUTOREDUCE_TIMEOUT_S": "120", "AUTOREDUCE_FAULT_POINT": point,
                    "AUTOREDUCE_FAULT_ACTION": action}}


# (point, copies of ReductionComplete that reach the broker)
RUNNER_POINTS = [
    ("before-send", 1),  # the dispatcher sends the Complete the runner had recorded
    ("after-store", 2),  # the broker holds the runner's copy; the dispatcher's repeats it
    ("after-receipt", 2),  # confirmed but not recorded: the same
    ("during-close", 1),  # recorded as posted: the dispatcher sends nothing
]


@pytest.mark.parametrize(("point", "copies"), RUNNER_POINTS)
def test_runner_stopped_at_each_step_of_posting(
    point: str, copies: int, start_dispatcher: Callable[..., DispatcherProcess],
    stomp: StompClient, broker_settings: BrokerSettings, reader: QueueReader,
    facility: Facility, kube: Any, namespace: str,
) -> None:
    start_dispatcher(runner=runner_env(point), retries=RETRIES_OFF)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                             rb=3100001, run=31, script=DONE_SCRIPT))
    seen = settle(reader, broker_settings, at_least=copies,
                  kube=kube, namespace=namespace)
    assert len(seen) == copies, [(d.destination, d.headers) for d in seen]
    assert one_kind_one_identity(seen, job=job_of(31, 3100001)) == "ReductionComplete"
    # Every copy says where the output is: the dispatcher's comes from the runner's record.
    for copy in seen:
        body = json.loads(copy.body)
        assert body["reduction_data"], body
        assert body["reduction_data"][0].endswith("/31/run-version-0"), body
    if copies == 2:
        assert seen[0].headers.get(POSSIBLE_REPEAT_HEADER) is None  # the runner's own


def test_runner_hung_in_posting_then_its_pod_deleted(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    # The pod is deleted (not just killed) while the runner waits for its receipt:
    # our finalizer keeps the pod, and so the runner's "sending" record, until the
    # dispatcher has read it. Without it the pod vanished and an Error was guessed.
    start_dispatcher(runner=runner_env("after-store", action="hang"), retries=RETRIES_OFF)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                             rb=3100002, run=32, script=DONE_SCRIPT))
    core = k8s.CoreV1Api(kube.api_client())
    reader.wait_for(lambda _: bool(finals(reader, broker_settings)), timeout=90)
    pod = wait_until(lambda: next(iter(core.list_namespaced_pod(
        namespace, label_selector=SELECTOR).items), None), timeout=30, what="the pod")
    core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=2)
    seen = settle(reader, broker_settings, at_least=2,
                  kube=kube, namespace=namespace)
    assert one_kind_one_identity(seen, job=job_of(32, 3100002)) == "ReductionComplete"
    assert len(seen) == 2
    # Once the outcome is settled the dispatcher lets the pod go.
    wait_until(lambda: not core.list_namespaced_pod(namespace, label_selector=SELECTOR).items,
               timeout=60, what="the released pod to go")


def test_a_cancel_that_meets_a_runner_sending_complete_keeps_the_complete(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    # The runner's Complete is on the broker (receipt unread, the runner hangs there)
    # when the cancellation arrives: the run must not also get "cancelled".
    start_dispatcher(runner=runner_env("after-store", action="hang"), retries=RETRIES_OFF)
    run = run_message(facility=facility, instrument="WISH", rb=3100004, run=34,
                      script=DONE_SCRIPT)
    send(stomp, broker_settings, run)
    reader.wait_for(lambda _: bool(finals(reader, broker_settings)), timeout=90)
    send(stomp, broker_settings, {**run, "cancel": True})
    seen = settle(reader, broker_settings, at_least=2, timeout=120,
                  kube=kube, namespace=namespace)
    assert one_kind_one_identity(seen, job=job_of(34, 3100004)) == "ReductionComplete"


@pytest.mark.parametrize(("point", "copies"), [("before-outcome-send", 1),
                                               ("after-outcome-send", 2)])
def test_dispatcher_stopped_at_each_step_of_its_own_post(
    point: str, copies: int, start_dispatcher: Callable[..., DispatcherProcess],
    stomp: StompClient, broker_settings: BrokerSettings, reader: QueueReader,
    facility: Facility, kube: Any, namespace: str,
) -> None:
    # The runner dies silently (exit 137); the dispatcher that posts its error exits at
    # the fault point; a healthy successor posts the verdict the first one recorded.
    faulty = start_dispatcher(name="faulty", fault_point=point, retries=RETRIES_OFF)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                             rb=3100003, run=33, script=CRASH_SCRIPT))
    kill_runner_when_running(kube, namespace, instrument="WISH", log_line="waiting to be")
    wait_until(lambda: faulty.process is not None and faulty.process.poll() is not None,
               timeout=120, what="the dispatcher to reach its fault point")
    assert faulty.process is not None and faulty.process.returncode == 137
    assert f"fault point {point} reached" in faulty.log()
    start_dispatcher(name="successor", retries=RETRIES_OFF)
    seen = settle(reader, broker_settings, at_least=copies,
                  kube=kube, namespace=namespace)
    assert len(seen) == copies, [(d.destination, d.body[:300]) for d in seen]
    assert one_kind_one_identity(seen, job=job_of(33, 3100003)) == "ReductionError"
    messages = {json.loads(d.body)["message"] for d in seen}
    assert len(messages) == 1, messages  # the same verdict, not a second opinion
    assert "exited with code 137" in messages.pop()


# -- direct admission: the dispatcher stopped between the writes of a run (issue 18) -----


def outcomes_by_run(seen: list[Delivery]) -> dict[int, list[str]]:
    by_run: dict[int, list[str]] = {}
    for copy in seen:
        by_run.setdefault(json.loads(copy.body)["run_number"], []).append(
            copy.destination.rsplit("/", 1)[-1].split(".")[0])
    return by_run


def stopped_at(faulty: DispatcherProcess, point: str) -> None:
    wait_until(lambda: faulty.process is not None and faulty.process.poll() is not None,
               timeout=120, what=f"the dispatcher to reach fault point {point}")
    assert faulty.process is not None and faulty.process.returncode == 137
    assert f"fault point {point} reached" in faulty.log()


# (fault point, a message too large for its Job): the inline message's writes are
# Lease | Job | ack; a large one's are Lease | Job | ConfigMap | ack.
DIRECT_POINTS = [("after-direct-lease", False), ("after-job-create", False),
                 ("after-job-create", True), ("after-config-map", True)]


@pytest.mark.parametrize(("point", "large"), DIRECT_POINTS)
def test_dispatcher_stopped_between_the_writes_of_a_direct_admission(
    point: str, large: bool, start_dispatcher: Callable[..., DispatcherProcess],
    stomp: StompClient, broker_settings: BrokerSettings, reader: QueueReader,
    facility: Facility, kube: Any, namespace: str,
) -> None:
    """Run 61 finds its RB free: Lease, then its Job created running (with its
    message, or then the ConfigMap of a large one), then the ack. The dispatcher exits
    (137, as abruptly as a SIGKILL) at each point in between; a successor gets the
    message again. Run 62 of the same RB arrives meanwhile. Each run reduces once, one
    at a time, and nothing is lost."""
    rb = 3300000 + DIRECT_POINTS.index((point, large))
    script = timeline_script(2) + ("\n#" + "x" * 20_000 + "\n" if large else "")
    faulty = start_dispatcher(name="faulty", fault_point=point, retries=RETRIES_OFF)
    for run in (61, 62):
        send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=rb,
                                                 run=run, script=script))
    stopped_at(faulty, point)
    start_dispatcher(name="successor", retries=RETRIES_OFF)
    seen = settle(reader, broker_settings, at_least=2, kube=kube, namespace=namespace)
    assert outcomes_by_run(seen) == {61: ["ReductionComplete"], 62: ["ReductionComplete"]}
    jobs = list_jobs(kube, namespace)
    assert sorted(job["metadata"]["name"] for job in jobs) == sorted(
        job_of(run, rb) for run in (61, 62))  # one Job per run, no void, no stray
    found = exclusivity_violations(jobs=jobs, timeline=read_timeline(facility))
    assert not found, found
    starts = [e["file"] for e in read_timeline(facility) if e["event"] == "start"]
    assert len(starts) == 2 and "61" in starts[0], starts  # each script once, in RB order


@pytest.mark.parametrize("fault", [None, "after-void"])
def test_a_cancelled_direct_run_is_voided_and_its_rb_moves_on(
    fault: str | None, start_dispatcher: Callable[..., DispatcherProcess],
    stomp: StompClient, broker_settings: BrokerSettings, reader: QueueReader,
    facility: Facility, kube: Any, namespace: str,
) -> None:
    """Run 71 is admitted directly, then cancelled while it reduces: its Job is
    deleted while the RB's Lease still names it. Before the waiting run 72 may have
    the RB, the dispatcher takes 71's name with a void Job, so that no late create of
    71 can ever run beside 72 (dispatcher.voids). With the fault, the dispatcher exits
    right after making the void, and a successor moves the Lease."""
    rb = 3310000 if fault is None else 3310001
    first = start_dispatcher(name="first", fault_point=fault, retries=RETRIES_OFF)
    cancelled = run_message(facility=facility, instrument="WISH", rb=rb, run=71,
                            script=timeline_script(120))
    send(stomp, broker_settings, cancelled)
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=rb,
                                             run=72, script=timeline_script(1)))
    wait_until(lambda: any(e["event"] == "start" for e in read_timeline(facility)),
               timeout=120, what="run 71 to reduce")
    send(stomp, broker_settings, {**cancelled, "cancel": True})
    if fault is not None:
        stopped_at(first, fault)
        start_dispatcher(name="successor", retries=RETRIES_OFF)
    seen = settle(reader, broker_settings, at_least=2, kube=kube, namespace=namespace,
                  timeout=180)
    by_run = outcomes_by_run(seen)
    assert by_run == {71: ["ReductionError"], 72: ["ReductionComplete"]}, by_run
    (error,) = [json.loads(d.body) for d in seen if json.loads(d.body)["run_number"] == 71]
    assert error["message"].startswith("Run cancelled"), error["message"]
    void = k8s.BatchV1Api(kube.api_client()).read_namespaced_job(job_of(71, rb), namespace)
    assert void.metadata.labels.get("autoreduce.io/void") == "true"
    assert void.spec.suspend is True
    timeline = read_timeline(facility)
    found = exclusivity_violations(jobs=list_jobs(kube, namespace), timeline=timeline)
    assert not found, found
    assert [e["file"] for e in timeline if e["event"] == "end"] == [
        facility.data_file("WISH", 72)]  # 71 was stopped; 72 ran whole, after it


# -- the RB stays held until the holder's pod has really stopped ---------------------------


def test_the_next_run_waits_for_a_stopping_pod_whose_script_ignores_sigterm(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    # Each RB's first run ignores SIGTERM (the runner SIGKILLs it kill_grace_s = 5 s
    # later); its pod is killed, deleted, evicted or runs past its deadline. The RB's
    # second run must not start before the first one's script and container stopped:
    # the Job controller's first verdict (FailureTarget) comes seconds earlier.
    start_dispatcher(retries=RETRIES_OFF,
                     instruments={"SLOW": {"active_deadline_seconds": 4}})
    recorder = PodRecorder(kube, namespace).start()
    faults = {"WISH": "kill", "LET": "delete", "MARI": "evict", "SLOW": "deadline"}
    stubborn, quick = timeline_script(30, ignore_term=True), timeline_script(0.3)
    for index, instrument in enumerate(faults):
        rb = 3200000 + index
        for run, script in ((40 + index, stubborn), (50 + index, quick)):
            send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                     rb=rb, run=run, script=script))
    core = k8s.CoreV1Api(kube.api_client())
    wait_until(lambda: len({e["file"] for e in read_timeline(facility)
                            if e["event"] == "start"}) >= 4, timeout=90,
               what="the four stubborn scripts to start")
    pods = {p.metadata.labels["autoreduce.io/instrument"]: p for p in
            core.list_namespaced_pod(namespace, label_selector=SELECTOR).items}
    for instrument, fault in faults.items():
        pod = pods[instrument]
        if fault == "kill":
            kill_container(kube, pod)
        elif fault == "delete":
            core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=20)
        elif fault == "evict":
            evict(kube, pod)
    seen = settle(reader, broker_settings, at_least=8, timeout=180,
                  kube=kube, namespace=namespace)
    recorder.stop()
    by_run: dict[int, set[str]] = {}
    for copy in seen:
        by_run.setdefault(json.loads(copy.body)["run_number"], set()).add(copy.destination)
    assert sorted(by_run) == [40, 41, 42, 43, 50, 51, 52, 53], by_run
    assert all(len(kinds) == 1 for kinds in by_run.values()), by_run
    # The scripts' own ticks, the containers' real start/finish times, the Jobs' holds.
    found = exclusivity_violations(jobs=list_jobs(kube, namespace),
                                   timeline=read_timeline(facility),
                                   pod_spans=recorder.spans_by_rb())
    assert not found, found
    # The stubborn scripts really outlived the first verdict: they noted SIGTERM.
    assert {e["file"] for e in read_timeline(facility) if e["event"] == "sigterm"}


# -- a restart whose Job list takes long (50,000 waiting runs) ---------------------------


def test_a_restarted_dispatcher_admits_free_rbs_before_its_job_list_is_in(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    """RB A: run 81 reduces, 82 waits; the dispatcher is SIGKILLed. Its successor's
    first Job list is held back 30 s (as 50,000 waiting runs slow it down), and it
    consumes meanwhile. Run 83 on the free RB B is admitted from the API's view of B
    while the list is held; 82, whose RB freed up, waits for the list (only the whole
    list says which of A's runs waited longest); 84 on A queues behind 82. Each run
    reduces once, RB A in arrival order, one at a time."""
    rb_a, rb_b = 3400001, 3400002
    first = start_dispatcher(name="first", retries=RETRIES_OFF)
    for run, sleep in ((81, 2), (82, 1)):
        send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                                 rb=rb_a, run=run, script=timeline_script(sleep)))
    wait_until(lambda: len(list_jobs(kube, namespace)) == 2, timeout=60, what="2 Jobs")
    first.kill(signal.SIGKILL)
    slow = start_dispatcher(name="slow-list", fault_point="hold-job-list", retries=RETRIES_OFF)
    wait_until(lambda: any(e["event"] == "end" for e in read_timeline(facility)),
               timeout=120, what="run 81 to end")
    for run, rb in ((83, rb_b), (84, rb_a)):
        send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=rb,
                                                 run=run, script=timeline_script(1)))

    def started(run: int) -> bool:
        return any(e["event"] == "start" and e["file"] == facility.data_file("WISH", run)
                   for e in read_timeline(facility))

    wait_until(lambda: started(83), timeout=60, what="run 83 to start on its free RB")
    assert "Job cache in" not in slow.log(), "the list was in before run 83 started"
    assert not started(82), "run 82 was admitted before the Job list was in"
    wait_until(lambda: "Job cache in" in slow.log(), timeout=90, what="the held Job list")
    seen = settle(reader, broker_settings, at_least=4, kube=kube, namespace=namespace,
                  timeout=180)
    assert outcomes_by_run(seen) == {run: ["ReductionComplete"] for run in (81, 82, 83, 84)}
    timeline = read_timeline(facility)
    found = exclusivity_violations(jobs=list_jobs(kube, namespace), timeline=timeline)
    assert not found, found
    on_a = [e["file"] for e in timeline if e["event"] == "start"
            and e["file"] != facility.data_file("WISH", 83)]
    assert on_a == [facility.data_file("WISH", run) for run in (81, 82, 84)], on_a

"""Busy cycles on the real scheduler: waiting for capacity, a new node, preemption of a
rerun, a drain (issue 20), on real nodes of a pool of their own.

The pool's nodes carry a label and a NoSchedule taint that only this module's
instrument selects and tolerates, so no other test's pod lands on them; each
reduction pod asks for 60 % of a node's allocatable CPU, so one fits a node and a
second waits. The scheduler's own verdicts are what is asserted: ``PodScheduled``
False with reason ``Unschedulable`` (the cluster autoscaler's signal), preemption of
the lower PriorityClass, and the Eviction API's DisruptionTarget on a drain.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.product import SLEEPY_SCRIPT, DispatcherProcess, Facility, run_message, wait_until
from devstack.queues import QueueReader
from dispatcher.identity import RunKey, job_name
from tests.conftest import needs_own_component
from tests.harness.checks import SELECTOR, assert_exclusive, outcomes, send
from tests.harness.cli import as_json, cli

pytestmark = pytest.mark.integration

INSTRUMENT = "MERLIN"
POOL_KEY = "autoreduce.io/test-pool"
POOL = "busy"


def sleeping(seconds: float) -> str:
    return SLEEPY_SCRIPT.replace('"0.3"', f'"{seconds}"')


class Pool:
    """Nodes added and removed as a cluster autoscaler would, all removed at the end."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube
        self.names: list[str] = []

    def grow(self, name: str) -> float:
        """Add a node of the pool; returns when it became Ready (monotonic time)."""
        try:
            self.kube.add_node(name, labels={POOL_KEY: POOL},
                               taints=[f"{POOL_KEY}={POOL}:NoSchedule"])  # fmt: skip
        except NotImplementedError as exc:
            needs_own_component(str(exc))
        self.names.append(name)
        return time.monotonic()

    def shrink(self, name: str) -> None:
        self.names.remove(name)
        self.kube.remove_node(name)

    def exactly(self, *names: str) -> None:
        """The pool is these nodes, whatever an earlier test left."""
        for name in [n for n in self.names if n not in names]:
            self.shrink(name)
        for name in [n for n in names if n not in self.names]:
            self.grow(name)

    def cpu_request(self, core: k8s.CoreV1Api) -> str:
        """60 % of a pool node's allocatable CPU: one reduction fits a node, two do not."""
        allocatable = core.read_node(self.names[0]).status.allocatable["cpu"]
        millis = int(allocatable[:-1]) if allocatable.endswith("m") else int(allocatable) * 1000
        return f"{millis * 6 // 10}m"


@pytest.fixture(scope="module")
def pool(kube: Any) -> Iterator[Pool]:
    nodes = Pool(kube)
    nodes.grow("busy-1")
    yield nodes
    for name in list(nodes.names):
        nodes.shrink(name)


@pytest.fixture
def core(kube: Any) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(kube.api_client())


def pool_overrides(pool: Pool, core: k8s.CoreV1Api) -> dict[str, Any]:
    return {INSTRUMENT: {
        "node_selector": {POOL_KEY: POOL},
        "tolerations": [{"key": POOL_KEY, "operator": "Equal", "value": POOL,
                         "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": pool.cpu_request(core), "memory": "64Mi"},
                      "limits": {"memory": "512Mi"}},
    }}  # fmt: skip


def name_of(rb: int, run: int, version: int = 0) -> str:
    return job_name(RunKey("ISIS", INSTRUMENT, (run,), version, str(rb)))


def pods_of(core: k8s.CoreV1Api, namespace: str, job: str) -> list[Any]:
    return list(core.list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items)


def condition(pod: Any, kind: str) -> Any:
    return next((c for c in pod.status.conditions or [] if c.type == kind), None)


def running_on(core: k8s.CoreV1Api, namespace: str, job: str) -> str | None:
    """The node of the Job's pod once its runner container runs."""
    for pod in pods_of(core, namespace, job):
        for status in pod.status.container_statuses or []:
            if status.name == "runner" and status.state and status.state.running:
                return str(pod.spec.node_name)
    return None


def unschedulable(core: k8s.CoreV1Api, namespace: str, job: str) -> Any:
    """The scheduler's PodScheduled=False (reason Unschedulable) of the Job's pod."""
    for pod in pods_of(core, namespace, job):
        scheduled = condition(pod, "PodScheduled")
        if scheduled is not None and scheduled.status == "False" \
                and scheduled.reason == "Unschedulable":
            return scheduled
    return None


def autoscaler_event(pod: Any, namespace: str) -> dict[str, Any]:
    """The Event the cluster autoscaler writes on a pod it scales up for."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "metadata": {"name": f"{pod.metadata.name}.{uuid.uuid4().hex[:12]}"},
        "involvedObject": {"kind": "Pod", "name": pod.metadata.name, "namespace": namespace,
                           "uid": pod.metadata.uid, "apiVersion": "v1"},
        "reason": "TriggeredScaleUp", "type": "Normal", "count": 1,
        "message": "pod triggered scale-up: [{busy 1->2 (max: 3)}]",
        "source": {"component": "cluster-autoscaler"},
        "firstTimestamp": now, "lastTimestamp": now,
    }  # fmt: skip


def finals(reader: QueueReader, settings: BrokerSettings) -> Counter[tuple[int, int]]:
    """(run, version) -> how many final outcomes it got."""
    return Counter((m["run_number"], m["run_version"])
                   for kind in ("complete", "error", "skipped")
                   for m in outcomes(reader, settings, kind))  # fmt: skip


def jobs_of(batch: k8s.BatchV1Api, namespace: str) -> list[Any]:
    return list(batch.list_namespaced_job(namespace, label_selector=SELECTOR).items)


def test_runs_wait_unschedulable_for_capacity_and_start_when_a_node_is_added(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, core: k8s.CoreV1Api, pool: Pool,
) -> None:
    pool.exactly("busy-1")
    proc = start_dispatcher(instruments=pool_overrides(pool, core))
    first, other_rb, same_rb = (3100001, 201), (3100002, 202), (3100001, 203)
    for rb, run in (first, other_rb, same_rb):
        send(stomp, broker_settings, run_message(facility=facility, instrument=INSTRUMENT,
                                                 rb=rb, run=run, script=sleeping(20)))
    # Both RBs' first runs are admitted; the node has room for one of them (which one
    # is the scheduler's choice). The other waits, and the real scheduler says why in
    # the words the cluster autoscaler acts on.
    def one_runs_one_waits() -> tuple[tuple[int, int], Any] | None:
        for runs, waits in ((first, other_rb), (other_rb, first)):
            verdict = unschedulable(core, namespace, name_of(*waits))
            if running_on(core, namespace, name_of(*runs)) and verdict is not None:
                return waits, verdict
        return None

    waiting, verdict = wait_until(one_runs_one_waits, timeout=90,
                                  what="one run reducing on busy-1, one Unschedulable")
    assert "Insufficient cpu" in verdict.message, verdict.message
    # status gives the scheduler's words and the autoscaler's answer. No cluster
    # autoscaler runs here: the test writes the Event it writes (core/v1, as it does),
    # and status finds it through the apiserver's own field selector.
    (pending,) = [p for p in pods_of(core, namespace, name_of(*waiting))
                  if p.status.phase == "Pending"]
    core.create_namespaced_event(namespace, autoscaler_event(pending, namespace))
    row = wait_until(lambda: next((r for r in as_json(cli(proc, "status", "-o", "json"))
                                   ["running"] if "cluster-autoscaler" in r["detail"]), None),
                     timeout=30, what="the autoscaler's word in status")
    assert re.search(r"Pending \(Unschedulable: 0/\d+ nodes are available: .*Insufficient cpu"
                     r".*; cluster-autoscaler: TriggeredScaleUp: pod triggered scale-up: "
                     r"\[\{busy 1->2 \(max: 3\)\}\]\)", row["detail"]), row
    # The first RB's second run waits for its RB, suspended: it has no pod, so it asks
    # the autoscaler for nothing.
    assert batch.read_namespaced_job(name_of(*same_rb), namespace).spec.suspend is True
    assert pods_of(core, namespace, name_of(*same_rb)) == []

    ready_at = pool.grow("busy-2")
    node = wait_until(lambda: running_on(core, namespace, name_of(*waiting)), timeout=60,
                      what="the waiting run to start on the new node")
    print(f"new node Ready -> waiting run reducing: {time.monotonic() - ready_at:.1f} s")
    assert node == "busy-2"

    reader.wait_for(lambda _: sum(finals(reader, broker_settings).values()) >= 3, timeout=180)
    reader.settle(2)
    assert finals(reader, broker_settings) == {(201, 0): 1, (202, 0): 1, (203, 0): 1}
    assert {m["run_number"] for m in outcomes(reader, broker_settings, "complete")} == {
        201, 202, 203}
    attempts = assert_exclusive(facility, jobs_of(batch, namespace))
    # RB order kept: the RB's second run started after its first had ended.
    assert len(attempts["3100001"]) == 2 and attempts["3100001"][0][1] < attempts[
        "3100001"][1][0]
    pool.shrink("busy-2")  # scale-down: the node is empty again


@pytest.fixture
def priority_classes(kube: Any) -> Iterator[dict[str, str]]:
    """A PriorityClass for run detection above one for reruns (the chart makes both)."""
    scheduling = k8s.SchedulingV1Api(kube.api_client())
    tag = uuid.uuid4().hex[:6]
    classes = {"run_detection": (f"ar-{tag}-run-detection", 1000),
               "rerun": (f"ar-{tag}-rerun", 10)}
    for name, value in classes.values():
        scheduling.create_priority_class({"metadata": {"name": name}, "value": value,
                                          "preemptionPolicy": "PreemptLowerPriority"})
    yield {source: name for source, (name, _) in classes.items()}
    for name, _ in classes.values():
        scheduling.delete_priority_class(name)


def test_a_run_detection_run_preempts_a_rerun_which_is_retried_once_and_completes(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, core: k8s.CoreV1Api, pool: Pool,
    priority_classes: dict[str, str],
) -> None:
    pool.exactly("busy-1")  # full with one reduction
    proc = start_dispatcher(instruments=pool_overrides(pool, core),
                     priority_classes={**priority_classes, "manual": priority_classes["rerun"]},
                     retries={"mode": "dispatcher", "max_attempts": 3, "delay_s": 300})
    rerun, detected = (3200001, 301), (3200002, 302)
    send(stomp, broker_settings, run_message(facility=facility, instrument=INSTRUMENT,
                                             rb=rerun[0], run=rerun[1], script=sleeping(60)),
         priority=0)  # fmt: skip
    wait_until(lambda: running_on(core, namespace, name_of(*rerun)), timeout=90,
               what="the rerun to reduce on the pool's one node")
    send(stomp, broker_settings, run_message(facility=facility, instrument=INSTRUMENT,
                                             rb=detected[0], run=detected[1],
                                             script=sleeping(5)),
         priority=9)  # fmt: skip

    # The scheduler makes room by preempting the rerun: its run version ends in one
    # ReductionError that says so, and is retried at once (not after retries.delay_s)
    # as the next version, which runs when the node is free again.
    reader.wait_for(lambda _: any(m["run_number"] == rerun[1] and m["run_version"] == 1
                                  for m in outcomes(reader, broker_settings, "complete")),
                    timeout=240)  # fmt: skip
    reader.settle(2)
    assert finals(reader, broker_settings) == {(301, 0): 1, (302, 0): 1, (301, 1): 1}
    (error,) = outcomes(reader, broker_settings, "error")
    assert error["run_number"] == 301 and "preempted by the scheduler" in error["message"], error
    assert [m["run_number"] for m in outcomes(reader, broker_settings, "complete")] == [302, 301]
    assert_exclusive(facility, jobs_of(batch, namespace))
    # explain tells both versions' story: the preemption, and who posted what.
    # (The outcome message can come before the Job controller's Complete condition.)
    story = wait_until(lambda: _story_once_complete(proc), timeout=60,
                       what="explain to show both versions finished")
    said = [(e["source"], e["text"]) for e in story["entries"]]
    # The scheduler's own Event on the preempted pod (gone since its run settled),
    # the verdict the dispatcher posted, and the retry's runner posting Complete.
    assert any(source == "default-scheduler" and text.startswith("Preempted")
               for source, text in said), said
    assert any(text.startswith("verdict recorded: ReductionError on the run's behalf "
                               "(Preempted)") for _, text in said), said
    assert any(source == "runner" and text.startswith("posted ReductionComplete")
               for source, text in said), said


def _story_once_complete(proc: DispatcherProcess) -> dict[str, Any] | None:
    story: dict[str, Any] = as_json(cli(proc, "explain", INSTRUMENT.lower(), "301", "-o", "json"))
    versions = [(v["version"], v["outcome"]) for v in story["versions"]]
    return story if versions == [("0", "Error"), ("1", "Complete")] else None


def test_a_drain_evicts_a_running_reduction_which_is_retried_once_on_another_node(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, core: k8s.CoreV1Api, pool: Pool, kube: Any,
) -> None:
    # Two new nodes, room elsewhere for the retry. Not busy-1: earlier tests' pods may
    # still be on it, finished but holding our finalizer (their dispatchers stopped
    # before releasing them), and a drain waits for every pod on the node.
    pool.exactly("busy-3", "busy-4")
    start_dispatcher(instruments=pool_overrides(pool, core),
                     retries={"mode": "dispatcher", "max_attempts": 3, "delay_s": 300})
    run = (3300001, 401)
    send(stomp, broker_settings, run_message(facility=facility, instrument=INSTRUMENT,
                                             rb=run[0], run=run[1], script=sleeping(60)))
    node = wait_until(lambda: running_on(core, namespace, name_of(*run)), timeout=90,
                      what="the run to reduce")
    drained = kube.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
                           "--timeout=120s", timeout=150)
    try:
        assert drained.returncode == 0, drained.stdout + drained.stderr
        reader.wait_for(lambda _: bool(outcomes(reader, broker_settings, "complete")),
                        timeout=180)
        reader.settle(2)
    finally:
        kube.kubectl("uncordon", node, check=True)
    assert finals(reader, broker_settings) == {(401, 0): 1, (401, 1): 1}
    (error,) = outcomes(reader, broker_settings, "error")
    assert "evicted through the Eviction API" in error["message"], error
    retried = pods_of(core, namespace, name_of(*run, version=1))
    assert retried and all(p.spec.node_name != node for p in retried), node
    assert_exclusive(facility, jobs_of(batch, namespace))

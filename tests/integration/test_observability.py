"""What an operator can see of a running dispatcher, on the real broker and API server:
Prometheus metrics that add up, Events that tell a Job's story, run-tagged JSON logs,
and `kubectl logs` that follows a reduction while it runs."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s
from prometheus_client.parser import text_string_to_metric_families

from devstack.activemq import free_port
from devstack.product import DispatcherProcess, Facility, run_message, wait_until
from devstack.queues import QueueReader
from dispatcher.identity import RunKey, job_name
from tests.harness.checks import send
from tests.harness.pods import in_background, kill_runner_when_running

pytestmark = pytest.mark.integration

FAST = """
def main(input_file, output_dir):
    open(output_dir + "/out.txt", "w").write("ok")
"""
SLOW = """
import time
def main(input_file, output_dir):
    time.sleep(4)
"""
# The test kills the runner's container once this runs (tests/harness/pods.py).
KILLER = """
import time
def main(input_file, output_dir):
    time.sleep(120)
"""
TICKING = """
import time
def main(input_file, output_dir):
    for tick in range(8):
        print(f"tick {tick}", flush=True)
        time.sleep(0.8)
"""


def scrape(port: int) -> dict[str, float]:
    """Samples by ``name{label=value,...}`` (labels sorted) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name)


def test_metrics_add_up_during_a_burst(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, kube: Any,
) -> None:
    port = free_port()
    proc = start_dispatcher(http_port=port, log_json=True)
    wait_until(lambda: _ready(port), timeout=30, what="/readyz")
    messages = [
        run_message(facility=facility, instrument=instrument, rb=rb, run=run, script=FAST)
        for rb, instrument in ((1940001, "WISH"), (1940002, "LET"), (1940003, "WISH"))
        for run in range(rb % 10 * 100, rb % 10 * 100 + 4)
    ]
    killer = run_message(facility=facility, instrument="MARI", rb=1940004, run=1, script=KILLER)
    kill_killer = in_background(lambda: kill_runner_when_running(
        kube, namespace, instrument="MARI", timeout=180))
    for message in [*messages, killer]:
        send(stomp, broker_settings, message)
    for message in messages[:3]:
        send(stomp, broker_settings, message)  # duplicates
    send(stomp, broker_settings, {"not": "a run"})  # unidentifiable: DLQ only
    send(stomp, broker_settings, {**messages[0], "run_number": 999, "reduction_arguments": 7})
    send(stomp, broker_settings, {"cancel": True, "instrument": "WISH", "rb_number": 1940009,
                                  "run_number": 5, "run_version": 0})
    waiting_seen: dict[str, float] = {}

    def watch_gauges() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not done.is_set():
            for key, value in scrape(port).items():
                if key.startswith("autoreduce_runs_waiting{") and value > 0:
                    waiting_seen[key] = max(value, waiting_seen.get(key, 0))
            time.sleep(0.1)

    done = threading.Event()
    watcher = threading.Thread(target=watch_gauges, daemon=True)
    watcher.start()
    q = broker_settings.queues
    final = {q.complete, q.error, q.skipped}
    # 13 runs end, plus one ReductionError for the identifiable bad message.
    kill_killer()
    reader.wait_for(lambda seen: sum(d.destination in final for d in seen) >= 14, timeout=240)
    reader.wait_for(lambda seen: sum(d.destination == q.dead_letter for d in seen) >= 2,
                    timeout=30)

    def settled() -> dict[str, float] | None:
        s = scrape(port)
        return s if total(s, "autoreduce_runs_received_total") >= 19 and total(
            s, "autoreduce_outcomes_on_behalf_total") >= 2 else None

    samples = wait_until(settled, timeout=60, what="all messages counted")
    done.set()
    watcher.join()
    received = total(samples, "autoreduce_runs_received_total")
    accepted = total(samples, "autoreduce_runs_accepted_total")
    duplicates = total(samples, "autoreduce_runs_duplicate_total")
    rejected = total(samples, "autoreduce_runs_rejected_total")
    cancels = total(samples, "autoreduce_cancel_requests_total")
    dropped = total(samples, "autoreduce_runs_cancelled_before_dispatch_total")
    assert (accepted, duplicates, rejected, cancels, dropped) == (13, 3, 2, 1, 0), samples
    assert received == accepted + duplicates + rejected + cancels + dropped == 19
    assert total(samples, "autoreduce_runs_admitted_total") == 13
    assert samples["autoreduce_admission_seconds_count{}"] == 13
    assert samples["autoreduce_dispatch_seconds_count{}"] == accepted + duplicates
    on_behalf = {k: v for k, v in samples.items()
                 if k.startswith("autoreduce_outcomes_on_behalf_total")}
    assert on_behalf.pop("autoreduce_outcomes_on_behalf_total{kind=Error,reason=Rejected}") == 1
    assert sum(on_behalf.values()) == 1, on_behalf  # the killed runner's run
    assert len(reader.bodies(q.error)) == 2 and len(reader.bodies(q.complete)) == 12
    # Runs waited for their RBs in the burst, by instrument; none are left.
    assert any("instrument=WISH" in k for k in waiting_seen), waiting_seen
    # (a run's pods may still be exiting after its outcome was posted)

    def drained_now() -> dict[str, float] | None:
        current = scrape(port)
        return current if total(current, "autoreduce_runs_running") == 0 else None

    drained = wait_until(drained_now, timeout=60, what="no run running")
    assert total(drained, "autoreduce_runs_waiting") == 0
    assert samples["autoreduce_broker_reconnects{}"] == 0
    assert total(samples, "autoreduce_api_reconnects_total") == 0
    # JSON logs: each line about a run names it.
    lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    accepted_lines = [e for e in lines if e["message"].startswith("accepted ")]
    assert len(accepted_lines) == 16
    name = job_name(RunKey("ISIS", "WISH", (100,), 0, "1940001"))
    entry = next(e for e in accepted_lines if e.get("job") == name)
    assert (entry["instrument"], entry["run"], entry["version"], entry["rb"]) == (
        "WISH", 100, 0, "1940001")
    admitted = [e for e in lines if e["message"].startswith("admitted ")]
    assert {e["job"] for e in admitted} >= {name}
    assert all({"instrument", "run", "version", "rb", "job"} <= set(e) for e in admitted)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def events_of(kube: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kube.kubectl("get", "events.events.k8s.io", "-n", namespace, "-o", "json",
                       "--field-selector", f"regarding.name={name}")
    items = json.loads(out.stdout)["items"]
    return sorted(items, key=lambda e: e.get("eventTime") or e["metadata"]["creationTimestamp"])


def test_events_tell_that_a_job_waited_for_its_rb_then_ran(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, kube: Any,
) -> None:
    start_dispatcher()
    for run in (1, 2):
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="GEM", rb=1940011, run=run, script=SLOW))
    q = broker_settings.queues
    reader.wait_for(lambda seen: len([d for d in seen if d.destination == q.complete]) == 2,
                    timeout=120)
    first = job_name(RunKey("ISIS", "GEM", (1,), 0, "1940011"))
    second = job_name(RunKey("ISIS", "GEM", (2,), 0, "1940011"))
    reasons = [e["reason"] for e in events_of(kube, namespace, second)
               if e.get("reportingController") == "autoreduce.io/dispatcher"]
    everything = kube.kubectl("get", "events.events.k8s.io", "-n", namespace, "-o", "json")
    assert reasons == ["Waiting", "Admitted"], everything.stdout[-6000:]
    waiting = next(e for e in events_of(kube, namespace, second) if e["reason"] == "Waiting")
    assert waiting["note"].startswith(f"waiting for RB 1940011: held by Job {first}")
    assert "GEM run 1 v0" in waiting["note"]
    first_reasons = [e["reason"] for e in events_of(kube, namespace, first)
                     if e.get("reportingController") == "autoreduce.io/dispatcher"]
    assert first_reasons == ["Admitted"]  # it never waited
    # `kubectl describe job` tells the story (it orders events.k8s.io Events loosely;
    # the order is asserted on eventTime above).
    described = kube.kubectl("describe", "job", second, "-n", namespace).stdout
    story = described.split("Events:", 1)[1]
    assert f"waiting for RB 1940011: held by Job {first}" in story, described
    assert "RB 1940011 is free: reducing" in story, described


def test_kubectl_logs_follows_a_running_reduction(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, facility: Facility, namespace: str, kube: Any,
    batch: k8s.BatchV1Api,
) -> None:
    start_dispatcher()
    send(stomp, broker_settings, run_message(
        facility=facility, instrument="INTER", rb=1940021, run=3, script=TICKING))
    name = job_name(RunKey("ISIS", "INTER", (3,), 0, "1940021"))
    core = k8s.CoreV1Api(batch.api_client)
    pod = wait_until(lambda: next((p for p in core.list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={name}").items
        if p.status.phase == "Running"), None), timeout=60, what="a running pod")
    assert pod.metadata.annotations["kubectl.kubernetes.io/default-container"] == "runner"
    # The harness's kubectl, started while the run is going: -f follows to the end.
    followed: list[subprocess.CompletedProcess[str]] = []
    helper = threading.Thread(target=lambda: followed.append(
        kube.kubectl("logs", "-f", "-n", namespace, f"job/{name}", timeout=60)))
    helper.start()
    # `kubectl logs -f job/<name>` (no -c: the annotation picks the runner container),
    # line by line with arrival times.
    lines: list[tuple[float, str]] = []
    follower = subprocess.Popen(
        [kube.kubectl_binary, "--kubeconfig", str(kube.kubeconfig), "logs", "-f",
         "-n", namespace, f"job/{name}"], stdout=subprocess.PIPE, text=True)
    assert follower.stdout is not None
    try:
        for line in follower.stdout:
            lines.append((time.monotonic(), line.rstrip()))
            if "tick 7" in line:
                break
    finally:
        follower.send_signal(signal.SIGTERM)
        follower.wait(10)
    ticks = [(t, text) for t, text in lines if text.startswith("tick ")]
    assert [text for _, text in ticks] == [f"tick {n}" for n in range(8)], lines
    # Live: the ticks arrived spread over the run, not all at the end.
    assert ticks[-1][0] - ticks[0][0] > 3.0, ticks
    helper.join(70)
    assert followed and followed[0].returncode == 0, followed
    assert all(f"tick {n}" in followed[0].stdout for n in range(8)), followed[0].stdout
    wait_until(lambda: (batch.read_namespaced_job(name, namespace).status.succeeded or 0) > 0,
               timeout=60, what="the Job to complete")



def test_a_run_held_back_by_the_cap_is_told_why_once(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, kube: Any,
) -> None:
    start_dispatcher(caps={"max_running": 1})
    send(stomp, broker_settings, run_message(
        facility=facility, instrument="HRPD", rb=1940031, run=1, script=SLOW))
    first = job_name(RunKey("ISIS", "HRPD", (1,), 0, "1940031"))
    wait_until(lambda: events_of(kube, namespace, first), timeout=30, what="first admitted")
    for run in (2, 3):  # other RBs: free, but the cap is full
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="HRPD", rb=1940031 + run, run=run, script=FAST))
    q = broker_settings.queues
    reader.wait_for(lambda seen: len([d for d in seen if d.destination == q.complete]) == 3,
                    timeout=120)
    for run in (2, 3):
        name = job_name(RunKey("ISIS", "HRPD", (run,), 0, str(1940031 + run)))
        ours = [e for e in events_of(kube, namespace, name)
                if e.get("reportingController") == "autoreduce.io/dispatcher"]
        assert [e["reason"] for e in ours] == ["Waiting", "Admitted"], ours
        assert ours[0]["note"] == "waiting for a slot: 1 runs reducing (max_running 1)"

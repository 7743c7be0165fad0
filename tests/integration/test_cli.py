"""The `autoreduce` CLI against the real broker and API server, with a real dispatcher.

Every command runs as a subprocess (`python -m autoreduce_cli`, and once as the
installed console script) reading the same settings file as the dispatcher.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.product import (
    DispatcherProcess,
    Facility,
    run_message,
    wait_until,
)
from devstack.queues import QueueReader
from dispatcher.identity import RunKey, job_name
from tests.harness.checks import SELECTOR, send, stored_message
from tests.harness.cli import as_json, cli

pytestmark = pytest.mark.integration

GOOD = """
import time
def main(input_file, output_dir):
    print("reducing", input_file, flush=True)
    time.sleep(0.5)
    open(output_dir + "/out.txt", "w").write("ok")
"""
BAD = """
def main(input_file, output_dir):
    raise ValueError("no good")
"""
SLOW = """
import time
def main(input_file, output_dir):
    time.sleep(6)
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def wait(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_follows_the_run_and_status_shows_it(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility, tmp_path: Path,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    proc = start_dispatcher()
    good = write(tmp_path, "reduce.py", GOOD)
    data = facility.data_file("WISH", 44001)
    # The console script, a human progress display, exit 0 on Complete.
    result = cli(proc, "submit", data, str(good), "--rb", "1930001", "--timeout", "120",
                 script=True)
    assert result.returncode == 0, result.stdout + result.stderr
    name = job_name(RunKey("ISIS", "WISH", (44001,), 0, "1930001"))
    assert f"Job {name}" in result.stdout
    assert "ReductionStarted" in result.stdout
    assert "ReductionComplete" in result.stdout
    job = batch.read_namespaced_job(name, namespace)
    assert job.metadata.annotations["autoreduce.io/priority"] == "1"  # manual submission
    # The message carries started_by -1 (legacy manual submission).
    message = stored_message(batch.api_client, namespace, name)
    assert message is not None
    assert message["started_by"] == -1 and message["run_number"] == 44001

    # A failing run: -o json gives the outcome as JSON, exit 1.
    bad = write(tmp_path, "bad.py", BAD)
    result = cli(proc, "submit", facility.data_file("LET", 9001), str(bad), "--rb", "1930002",
                 "-o", "json", "--timeout", "120")
    assert result.returncode == 1, result.stdout + result.stderr
    outcome = as_json(result)
    assert outcome["outcome"] == "Error" and "no good" in outcome["message"]
    assert "Job red-let-9001-v0" in result.stderr  # progress goes to stderr under -o json

    # The outcome message can arrive before the Job's final condition (the pod is
    # still stopping on the real node): status lists the run as finished once it is.
    def both_finished() -> dict[str, Any] | None:
        now = as_json(cli(proc, "status", "-o", "json"))
        return now if len(now["finished"]) == 2 else None

    status = wait_until(both_finished, timeout=30, what="both runs to be finished in status")
    finished = {r["job"]: r for r in status["finished"]}
    assert finished[name]["outcome"] == "Complete"
    assert finished[outcome["job"]]["outcome"] == "Error"
    assert status["by_instrument"]["WISH"] == {"waiting": 0, "running": 0, "finished": 1}
    human = cli(proc, "status", "--instrument", "wish")
    assert human.returncode == 0, human.stderr
    assert "RECENTLY FINISHED (1 of 1)" in human.stdout and name in human.stdout
    assert "Complete" in human.stdout and "LET" not in human.stdout
    watched = cli(proc, "status", "--watch", "0.2", "--count", "3")
    assert watched.stdout.count("RECENTLY FINISHED") == 3
    stream = cli(proc, "status", "--watch", "0.2", "--count", "2", "-o", "json")
    assert [len(json.loads(line)["finished"]) for line in stream.stdout.splitlines()] == [2, 2]


def test_status_shows_who_holds_the_rb_and_cancel_removes_a_waiting_run(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility, tmp_path: Path,
    namespace: str, batch: k8s.BatchV1Api, reader: QueueReader,
    broker_settings: BrokerSettings,
) -> None:
    proc = start_dispatcher()
    slow = write(tmp_path, "slow.py", SLOW)
    for run in (101, 102):
        sent = cli(proc, "submit", facility.data_file("MARI", run), str(slow), "--rb", "1930003",
                   "--no-wait", "-o", "json")
        assert sent.returncode == 0, sent.stderr
    first = job_name(RunKey("ISIS", "MARI", (101,), 0, "1930003"))
    second = job_name(RunKey("ISIS", "MARI", (102,), 0, "1930003"))

    def both_seen() -> Any:
        status = as_json(cli(proc, "status", "-o", "json"))
        return status if len(status["running"]) == 1 and len(status["waiting"]) == 1 else None

    status = wait("one running, one waiting", both_seen)
    assert status["running"][0]["job"] == first
    waiting = status["waiting"][0]
    assert waiting["job"] == second and waiting["detail"] == f"RB held by {first}"
    assert status["holders"] == {"1930003": first}
    human = cli(proc, "status", "--rb", "1930003").stdout
    assert "WAITING (1" in human and f"RB held by {first}" in human

    cancelled = cli(proc, "cancel", "--instrument", "mari", "--rb", "1930003", "--run", "102",
                    "--version", "0", "-o", "json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert as_json(cancelled)["cancel"] is True
    q = broker_settings.queues
    reader.wait_for(lambda seen: any(
        d.destination == q.error and b"cancelled while waiting" in d.body for d in seen),
        timeout=60)
    wait("the cancelled Job gone", lambda: not any(
        j.metadata.name == second and j.metadata.deletion_timestamp is None
        for j in batch.list_namespaced_job(namespace, label_selector=SELECTOR).items))
    reader.wait_for(lambda seen: any(d.destination == q.complete for d in seen), timeout=60)

    # With a consumer taking the outcomes (as the web app does), submit still ends: from
    # the outcome message if it browsed it in time, else from the finished Job.
    draining = threading.Event()

    def drain() -> None:
        while not draining.is_set():
            reader.settle(0.2)

    consumer = threading.Thread(target=drain, daemon=True)
    consumer.start()
    good = write(tmp_path, "good.py", GOOD)
    followed = cli(proc, "submit", facility.data_file("MARI", 103), str(good), "--rb", "1930013",
                   "-o", "json", "--timeout", "120")
    draining.set()
    consumer.join()
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert as_json(followed)["outcome"] == "Complete"


def test_status_gives_the_schedulers_own_reason_for_a_pod_it_cannot_place(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility, tmp_path: Path,
    reader: QueueReader, broker_settings: BrokerSettings,
) -> None:
    """A run whose pod asks for more CPU than any node has: the real kube-scheduler
    marks it Unschedulable (what the cluster autoscaler acts on), and status says so
    in the scheduler's words."""
    proc = start_dispatcher(instruments={"GEM": {"resources": {
        "requests": {"cpu": "64", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}}})
    good = write(tmp_path, "good.py", GOOD)
    sent = cli(proc, "submit", facility.data_file("GEM", 77), str(good), "--rb", "1930077",
               "--no-wait", "-o", "json")
    assert sent.returncode == 0, sent.stderr

    def unschedulable() -> Any:
        running = as_json(cli(proc, "status", "-o", "json"))["running"]
        return running[0] if running and "Unschedulable" in running[0]["detail"] else None

    row = wait("the scheduler's verdict in status", unschedulable)
    assert re.search(r"Pending \(Unschedulable: 0/\d+ nodes are available: .*Insufficient cpu",
                     row["detail"]), row
    human = cli(proc, "status", "--instrument", "gem").stdout
    assert "Insufficient cpu" in human, human
    # explain tells the run's story: its arrival, its admission and the scheduler's
    # own Event, in time order.
    explained = as_json(cli(proc, "explain", "gem", "77", "-o", "json"))
    said = [(e["source"], e["text"]) for e in explained["entries"]]
    sources = [source for source, _ in said]
    assert sources[:2] == ["broker", "dispatcher"], said
    assert any(source == "default-scheduler" and re.search(
        r"FailedScheduling: 0/\d+ nodes are available: .*Insufficient cpu", text)
        for source, text in said), said
    assert any(source == "autoreduce.io/dispatcher" and text.startswith("Admitted")
               for source, text in said), said
    story = cli(proc, "explain", "gem", "77").stdout
    assert "GEM run 77: 1 version(s)" in story and "Insufficient cpu" in story, story
    cancelled = cli(proc, "cancel", "--instrument", "gem", "--rb", "1930077", "--run", "77",
                    "--version", "0")
    assert cancelled.returncode == 0, cancelled.stderr
    q = broker_settings.queues
    reader.wait_for(lambda seen: any(d.destination == q.error for d in seen), timeout=60)


def test_retry_and_rerun_resubmit_the_stored_message_as_the_next_version(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility, tmp_path: Path,
    namespace: str, batch: k8s.BatchV1Api, stomp: StompClient,
    broker_settings: BrokerSettings,
) -> None:
    # No queue reader here: the CLI browses the outcome queues, a reader would eat them.
    proc = start_dispatcher()
    send(stomp, broker_settings, run_message(
        facility=facility, instrument="GEM", rb=1930004, run=77, script=BAD,
        description="first try", custom_field="kept"))
    v0 = job_name(RunKey("ISIS", "GEM", (77,), 0, "1930004"))
    wait("v0 finished", lambda: (batch.read_namespaced_job(v0, namespace).status.failed or 0)
         > 0 if any(j.metadata.name == v0 for j in batch.list_namespaced_job(namespace).items)
         else False, timeout=120)
    # retry JOB, followed to its outcome (the same script fails again).
    result = cli(proc, "retry", v0, "-o", "json", "--timeout", "120")
    assert result.returncode == 1, result.stdout + result.stderr
    retried = as_json(result)
    v1 = job_name(RunKey("ISIS", "GEM", (77,), 1, "1930004"))
    assert retried["job"] == v1 and retried["outcome"] == "Error"
    job = batch.read_namespaced_job(v1, namespace)
    assert job.metadata.annotations["autoreduce.io/priority"] == "0"
    message = stored_message(batch.api_client, namespace, v1)
    assert message is not None
    assert message["run_version"] == 1 and message["custom_field"] == "kept"
    assert "message" not in message and "reduction_log" not in message
    # rerun by identity, from v0's message: the next free version is 2, not 1.
    result = cli(proc, "rerun", "--instrument", "GEM", "--run", "77", "--version", "0",
                 "--description", "again", "--no-wait")
    assert result.returncode == 0, result.stderr
    v2 = job_name(RunKey("ISIS", "GEM", (77,), 2, "1930004"))
    assert v2 in result.stdout
    wait("Job v2", lambda: any(j.metadata.name == v2 for j in batch.list_namespaced_job(
        namespace, label_selector=SELECTOR).items))
    missing = cli(proc, "retry", "red-gem-1-v0-00000000")
    assert missing.returncode == 6 and "no message stored" in missing.stderr


def test_render_prints_the_job_without_creating_it_and_validates_on_the_server(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility, tmp_path: Path,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    proc = start_dispatcher()
    message = run_message(facility=facility, instrument="OSIRIS", rb=1930005, run=5, script=GOOD)
    path = write(tmp_path, "message.json", json.dumps(message))
    result = cli(proc, "render", str(path), "-o", "json")
    assert result.returncode == 0, result.stderr
    job = as_json(result)
    assert job["kind"] == "Job"
    assert job["metadata"]["name"] == job_name(RunKey("ISIS", "OSIRIS", (5,), 0, "1930005"))
    assert job["spec"]["suspend"] is True
    human = cli(proc, "render", str(path), "--dry-run-server")
    assert human.returncode == 0, human.stderr
    assert "kind: Job" in human.stdout and "the API accepts" in human.stderr
    assert not batch.list_namespaced_job(namespace).items  # nothing was created
    broken = write(tmp_path, "broken.json", json.dumps({**message, "rb_number": "12-x"}))
    refused = cli(proc, "render", str(broken))
    assert refused.returncode == 2 and "dead-letter" in refused.stderr


def test_dead_letters_list_show_and_requeue(
    start_dispatcher: Callable[..., DispatcherProcess], facility: Facility,
    namespace: str, batch: k8s.BatchV1Api, stomp: StompClient,
    broker_settings: BrokerSettings,
) -> None:
    q = broker_settings.queues
    reader = QueueReader(broker_settings)  # outcome queues only: the DLQ is the CLI's
    reader.watch(q.complete)
    # A good run that an earlier fault parked on the DLQ, and a bad one the dispatcher parks.
    good = run_message(facility=facility, instrument="POLARIS", rb=1930006, run=61, script=GOOD)
    stomp.send(destination=q.dead_letter, body=json.dumps(good).encode(), priority=9,
               headers={"autoreduce-reason": "dispatcher error: the API was on fire",
                        "original-priority": "9"})
    proc = start_dispatcher()
    send(stomp, broker_settings, {**run_message(facility=facility, instrument="POLARIS",
                                                rb=1930006, run=62, script=GOOD),
                                  "reduction_arguments": "not an object"})

    def listed() -> Any:
        rows = as_json(cli(proc, "dead-letters", "list", "-o", "json"))
        return rows if len(rows) == 2 else None

    rows = wait("two dead letters", listed)
    by_run = {r["run"]: r for r in rows}
    assert by_run["61"]["reason"] == "dispatcher error: the API was on fire"
    assert "reduction_arguments" in by_run["62"]["reason"]
    human = cli(proc, "dead-letters", "list")
    assert "MESSAGE-ID" in human.stdout and "on fire" in human.stdout
    shown = cli(proc, "dead-letters", "show", by_run["61"]["message_id"])
    assert "reason (autoreduce-reason): dispatcher error: the API was on fire" in shown.stdout
    assert '"instrument": "POLARIS"' in shown.stdout
    detail = as_json(cli(proc, "dead-letters", "show", by_run["62"]["message_id"], "-o", "json"))
    assert detail["headers"]["autoreduce-reason"] == by_run["62"]["reason"]

    moved = cli(proc, "dead-letters", "requeue", by_run["61"]["message_id"], "-o", "json")
    assert moved.returncode == 0, moved.stderr
    assert as_json(moved) == {"requeued": [by_run["61"]["message_id"]], "missing": []}
    name = job_name(RunKey("ISIS", "POLARIS", (61,), 0, "1930006"))
    reader.wait_for(lambda seen: any(
        d.destination == q.complete and json.loads(d.body)["run_number"] == 61 for d in seen),
        timeout=120)
    job = batch.read_namespaced_job(name, namespace)
    assert job.metadata.annotations["autoreduce.io/priority"] == "9"
    remaining = as_json(cli(proc, "dead-letters", "list", "-o", "json"))
    assert [r["run"] for r in remaining] == ["62"]
    again = cli(proc, "dead-letters", "requeue", by_run["61"]["message_id"])
    assert again.returncode == 6 and "not on the dead-letter queue" in again.stdout
    reader.close()

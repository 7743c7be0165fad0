"""Every run ends in exactly one outcome; retries, cancelling running work, caps, HA
(issue 5 acceptance), on the real broker, API server and node agent."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from tests.conftest import QueueReader
from tests.harness.activemq import free_port
from tests.harness.checks import (
    SELECTOR,
    assert_exclusive,
    count_outcomes,
    outcomes,
    send,
)
from tests.harness.product import (
    SLEEPY_SCRIPT,
    DispatcherProcess,
    Facility,
    read_timeline,
    run_message,
    wait_until,
)

pytestmark = pytest.mark.integration

HUNGRY_SCRIPT = """
def main(input_file, output_dir):
    block = bytearray(600 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
"""
KILLER_SCRIPT = """
import os, signal
def main(input_file, output_dir):
    print("taking the runner down with me", flush=True)
    os.kill(os.getppid(), signal.SIGKILL)
"""
LONG_SCRIPT = SLEEPY_SCRIPT.replace('"0.3"', '"60"')


def errors_for(reader: QueueReader, settings: BrokerSettings, run: int) -> list[dict[str, Any]]:
    return [m for m in outcomes(reader, settings, "error") if m["run_number"] == run]


def test_silent_deaths_each_get_one_error_with_the_reason_and_free_the_rb(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
) -> None:
    start_dispatcher(
        instruments={
            "OOM": {"resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                  "limits": {"memory": "200Mi"}}},
            "SLOW": {"active_deadline_seconds": 4},
        },
        retries={"mode": "dispatcher", "max_attempts": 1},
    )
    cases = [("OOM", HUNGRY_SCRIPT, "out of memory (limit 200Mi)"),
             ("SLOW", LONG_SCRIPT, "time limit of 4 s"),
             ("CRASH", KILLER_SCRIPT, "exited with code")]
    for index, (instrument, script, _) in enumerate(cases):
        rb = 2100000 + index
        send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                 rb=rb, run=10 + index, script=script))
        # A second run of the same RB must start once the first one died.
        send(stomp, broker_settings, run_message(facility=facility, instrument=instrument,
                                                 rb=rb, run=20 + index, script=SLEEPY_SCRIPT))
    reader.wait_for(count_outcomes(broker_settings, 6), timeout=180)
    reader.settle(5)
    for index, (_, _, fragment) in enumerate(cases):
        errors = errors_for(reader, broker_settings, 10 + index)
        assert len(errors) == 1, errors
        assert fragment in errors[0]["message"], errors[0]["message"]
    complete = sorted(m["run_number"] for m in outcomes(reader, broker_settings, "complete"))
    assert complete == [20, 21, 22]


def test_evicted_run_is_reported_once_and_retried_as_the_next_version(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    start_dispatcher(retries={"mode": "dispatcher", "max_attempts": 2, "delay_s": 1})
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH", rb=2200001,
                                             run=31, script=LONG_SCRIPT.replace('"60"', '"8"')))
    core = k8s.CoreV1Api(kube.api_client())

    def running_pod() -> str | None:
        for pod in core.list_namespaced_pod(namespace, label_selector=SELECTOR).items:
            if pod.status.phase == "Running":
                return str(pod.metadata.name)
        return None

    pod = wait_until(running_pod, timeout=60, what="a running runner pod")
    time.sleep(1)
    core.patch_namespaced_pod(pod, namespace,
                              {"metadata": {"annotations": {"autoreduce.test/evict": "true"}}})
    reader.wait_for(lambda seen: bool(outcomes(reader, broker_settings, "complete")),
                    timeout=120)
    reader.settle(3)
    errors = errors_for(reader, broker_settings, 31)
    assert len(errors) == 1 and "evicted" in errors[0]["message"], errors
    assert errors[0]["run_version"] == 0
    (complete,) = outcomes(reader, broker_settings, "complete")
    assert complete["run_version"] == 1  # the retry, as a new version


def test_retry_in_is_honoured_bounded_and_survives_a_dispatcher_restart(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
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


def test_cancelling_a_running_run_stops_it_and_frees_the_rb(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
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


@pytest.mark.timeout(900)
def test_two_replicas_with_one_killed_every_few_seconds(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, batch: k8s.BatchV1Api,
) -> None:
    runs = 200
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
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return 0

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

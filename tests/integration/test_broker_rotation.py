"""Rotating both broker passwords during a burst loses and repeats nothing (issue 19,
item 5), on the real broker and real runner pods.

The broker admin changes the two passwords live (the suite's broker reads its JAAS
users.properties again at the next login), the operator changes the runners' Secret
and rolls the dispatcher with its new password. Pods already running hold the old
password in their mounted file until the kubelet refreshes it; they read the file
again on every connect and keep trying (``broker_connect_timeout_s``), so their
outcome waits instead of being lost or posted twice.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.pod_contract import POSSIBLE_REPEAT_HEADER
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from devstack.activemq import ActiveMQ
from devstack.product import SLEEPY_SCRIPT, DispatcherProcess, Facility, run_message
from devstack.queues import QueueReader
from tests.conftest import needs_own_component
from tests.harness.checks import count_outcomes, send
from tests.harness.stomp_frames import RawStomp

pytestmark = pytest.mark.integration

SLOW_SCRIPT = SLEEPY_SCRIPT.replace('"0.3"', '"8"')


@pytest.mark.timeout(600)  # its outcome wait (420 s) must not meet the suite's 300 s
def test_both_passwords_rotated_during_a_burst_lose_and_repeat_nothing(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient, broker: Any,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    if not isinstance(broker, ActiveMQ):
        needs_own_component("rotating passwords needs the suite's own broker")
    runs = [(1800000 + rb, 10 * rb + i) for i in range(3) for rb in range(4)]
    first = start_dispatcher()
    for rb, run in runs:
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=rb, run=run, script=SLOW_SCRIPT))
    # Reductions under way, each pod holding the old runner password.
    reader.wait_for(lambda seen: sum(d.destination == broker_settings.queues.started
                                     for d in seen) >= 2, timeout=120)

    # The broker admin first, the Secrets some seconds later, as people do it: posts
    # in between meet a broker that refuses the old password, and wait.
    old_runner = broker.runner
    runner = broker.rotate("runner", "runner-password-rotated")
    broker.rotate("dispatcher", "dispatcher-password-rotated")
    time.sleep(10)
    k8s.CoreV1Api(kube.api_client()).patch_namespaced_secret(
        "autoreduce-broker", namespace, {"stringData": {"password": runner.password}})
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)  # the rollout of the new Secret
    assert first.process.wait(60) == 0
    second = start_dispatcher(name="dispatcher-rotated")  # with the new password

    reader.wait_for(count_outcomes(broker_settings, len(runs)), timeout=420)
    reader.settle(5)
    q = broker_settings.queues
    by_queue = Counter(d.destination for d in reader.seen)
    assert by_queue[q.error] == 0 and by_queue[q.dead_letter] == 0, [
        json.loads(d.body).get("message") for d in reader.seen if d.destination == q.error]
    for queue in (q.started, q.complete):
        numbers = sorted(json.loads(d.body)["run_number"] for d in reader.seen
                         if d.destination == queue)
        assert numbers == sorted(run for _, run in runs), queue  # each once, none lost
    assert not [d for d in reader.seen if d.headers.get(POSSIBLE_REPEAT_HEADER) == "true"]
    assert second.alive()
    # The old password really stopped working, so whatever posted after the rotation
    # used the new one.
    address, port = broker_settings.host_and_ports()[0]
    session = RawStomp(address, port, user=old_runner.user, password=old_runner.password,
                       ca_file=broker_settings.tls.ca_file)
    assert session.connected.command == "ERROR", session.connected
    # How many pods met the old password on the broker and waited for the new file
    # (timing decides; a figure, not a condition).
    retried = [pod for pod in kube.kubectl("get", "pods", "-n", namespace, "-o", "name",
                                           check=True).stdout.split()
               if "password is invalid" in kube.kubectl(
                   "logs", "-n", namespace, pod, "--all-containers").stdout]
    print(f"\n{len(retried)} of {len(runs)} runner pods retried with the rotated password")

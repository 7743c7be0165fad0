"""The dispatcher at the apiserver's pace: real 429s from API Priority and Fairness.

The test gives a ServiceAccount of its own a FlowSchema that sends its every request
to a priority level with one concurrency share (a seat or two of the server's 600),
no borrowing and no queue: what does not fit is refused at once with 429 and
Retry-After, before it is executed. Other requests from the same account (LISTs of a
few hundred Leases, from several threads) keep the level full, as a busy neighbour in
the same flow would. Then:

- ``Kube`` itself: a server running APF lifts the client-side budget; creates refused
  with 429 are sent again and every one is stored exactly once;
- the dispatcher as that account: every run gets exactly one outcome, nothing is
  dead-lettered, and the throttling shows in its metric and its log.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devstack.activemq import free_port
from devstack.product import DispatcherProcess, Facility, run_message, wait_until
from devstack.queues import QueueReader
from dispatcher.kube import Kube
from tests.harness.checks import count_outcomes, http_status, outcomes, send
from tests.integration.test_observability import scrape, total
from tests.integration.test_token_rotation import ACCOUNT, grant_anything_here

pytestmark = pytest.mark.integration

NEIGHBOUR_THREADS = 6
LEASES_LISTED = 300
THROTTLED = "autoreduce_api_throttled_total"


@pytest.fixture
def tiny_flow(kube: Any, namespace: str) -> Iterator[Path]:
    """A kubeconfig for ``namespace``'s ServiceAccount, whose requests land on a
    priority level of one share that rejects what does not fit."""
    grant_anything_here(kube, namespace)
    flow = k8s.FlowcontrolApiserverV1Api(kube.api_client())
    name = f"autoreduce-{namespace}"
    flow.create_priority_level_configuration({
        "metadata": {"name": name},
        "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Reject"}}},
    })  # fmt: skip
    schema = flow.create_flow_schema({
        "metadata": {"name": name},
        "spec": {
            "priorityLevelConfiguration": {"name": name},
            "matchingPrecedence": 200,  # ahead of the suggested service-accounts (9000)
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{
                "subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                    "name": ACCOUNT, "namespace": namespace}}],
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                   "namespaces": [namespace]}],
            }],
        },
    })  # fmt: skip
    kubeconfig = kube.service_account_kubeconfig(namespace=namespace, name=ACCOUNT)
    # The APF configuration and RBAC reach the filter through informers: wait until a
    # request of ours is classified into the new schema.
    wait_until(lambda: classified_by(kubeconfig, namespace) == schema.metadata.uid,
               timeout=60, what="requests classified into the test's FlowSchema")  # fmt: skip
    coordination = k8s.CoordinationV1Api(kube.api_client())
    for i in range(LEASES_LISTED):
        coordination.create_namespaced_lease(namespace, {"metadata": {"name": f"ballast-{i}"}})
    yield kubeconfig
    flow.delete_flow_schema(name)
    flow.delete_priority_level_configuration(name)


def classified_by(kubeconfig: Path, namespace: str) -> str | None:
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        try:
            _, _, headers = k8s.CoordinationV1Api(api).list_namespaced_lease_with_http_info(
                namespace, limit=1)
        except k8s.ApiException:
            return None  # RBAC not there yet, or a 429 already
    return headers.get("X-Kubernetes-PF-FlowSchema-UID")


class Neighbour:
    """Threads of the same account listing Leases back to back, retrying 429s at once:
    the level stays full, so our requests meet real 429s."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self._stop = threading.Event()
        self.refused = 0
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=str(kubeconfig),
                                    client_configuration=configuration)  # fmt: skip
        # Else urllib3 itself sleeps out each 429's Retry-After and sends it again (its
        # default Retry honours the header), and the level is not kept full.
        configuration.retries = False
        configuration.connection_pool_maxsize = NEIGHBOUR_THREADS
        self._api = k8s.ApiClient(configuration)
        self._threads = [threading.Thread(target=self._run, args=(namespace,), daemon=True)
                         for _ in range(NEIGHBOUR_THREADS)]  # fmt: skip

    def __enter__(self) -> Neighbour:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._api.close()

    def _run(self, namespace: str) -> None:
        leases = k8s.CoordinationV1Api(self._api)
        while not self._stop.is_set():
            try:
                leases.list_namespaced_lease(namespace, _preload_content=False).read()
            except k8s.ApiException as error:
                self.refused += error.status == 429


def test_kube_lifts_its_budget_under_apf_and_stores_every_throttled_create_once(
    tiny_flow: Path, namespace: str, kube: Any
) -> None:
    throttled: list[float] = []

    class Seen:
        def api_throttled(self, wait_s: float) -> None:
            throttled.append(wait_s)

        def api_client_budget(self, qps: float | None) -> None:
            return

    ours = Kube.connect(kubeconfig=tiny_flow, namespace=namespace, observer=Seen())
    assert ours.get_lease("ballast-0") is not None
    assert ours.pacer.client_qps is None  # the server runs APF: no client-side budget
    names = [f"stored-{i}" for i in range(60)]
    with ThreadPoolExecutor(4) as pool:
        with Neighbour(tiny_flow, namespace) as neighbour:
            wait_until(lambda: neighbour.refused > 0, timeout=60, what="the level full")
            futures = [pool.submit(ours.create_lease, {"metadata": {"name": n}}) for n in names]
            # The neighbour retries at once and without end, so while it runs it wins
            # nearly every free seat; it stops once ours have been refused a few times,
            # as a real burst ends, and ours (still waiting them out) go through.
            wait_until(lambda: len(throttled) >= 3, timeout=60, what="our creates throttled")
        created = [future.result(timeout=120) for future in futures]
    assert len(created) == len(names)
    assert throttled, "no create met a 429: the neighbour did not fill the level"
    assert all(wait >= 1.0 for wait in throttled)  # the server's Retry-After, at least
    leases = k8s.CoordinationV1Api(kube.api_client()).list_namespaced_lease(namespace).items
    stored = Counter(lease.metadata.name for lease in leases)
    assert all(stored[name] == 1 for name in names)


def test_a_throttled_dispatcher_keeps_every_run_and_says_so(
    tiny_flow: Path, namespace: str, start_dispatcher: Callable[..., DispatcherProcess],
    stomp: StompClient, broker_settings: BrokerSettings, reader: QueueReader,
    facility: Facility,
) -> None:  # fmt: skip
    port = free_port()
    proc = start_dispatcher(kubeconfig=tiny_flow, http_port=port, concurrency=2)
    wait_until(lambda: http_status(port, "/readyz") == 200, timeout=60, what="ready")
    runs = range(1, 7)
    with Neighbour(tiny_flow, namespace):
        for run in runs:  # three RBs, two runs each: admission waits and hands on
            send(stomp, broker_settings, run_message(
                facility=facility, instrument="WISH", rb=3200000 + run % 3, run=run,
                script="def main(input_file, output_dir):\n    pass\n"))  # fmt: skip
        wait_until(lambda: total(scrape(port), THROTTLED) >= 3, timeout=120,
                   what="the dispatcher throttled by the apiserver")  # fmt: skip
    reader.wait_for(count_outcomes(broker_settings, len(runs)), timeout=300)
    reader.settle(5)
    complete = Counter(m["run_number"] for m in outcomes(reader, broker_settings, "complete"))
    assert complete == Counter(runs), complete  # each run once
    assert outcomes(reader, broker_settings, "error") == []
    assert outcomes(reader, broker_settings, "dead_letter") == []
    started = [m["run_number"] for m in outcomes(reader, broker_settings, "started")]
    for rb in range(3):  # each RB's runs started in the order they were sent
        assert [run for run in started if run % 3 == rb] == [r for r in runs if r % 3 == rb]
    log = proc.log()
    assert "the API server applies Priority and Fairness to us" in log
    assert "the API server is throttling us (429 on" in log
    assert proc.alive() and proc.starts == 1

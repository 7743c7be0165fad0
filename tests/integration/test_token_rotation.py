"""A dispatcher whose token stops working keeps every run (issue 17: 401 not mapped).

The dispatcher authenticates as a ServiceAccount with a token read from a file, as a
pod does with its projected token. The token is bound to a Secret, so deleting the
Secret revokes it at once on the real API server (a TokenRequest lives 10 minutes at
least). Runs sent meanwhile stay in the broker: not dead-lettered, no ReductionError,
readiness false. Once the file holds a new token, every run gets exactly one outcome.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devstack.activemq import free_port
from devstack.product import SLEEPY_SCRIPT, DispatcherProcess, Facility, run_message, wait_until
from devstack.queues import QueueReader
from tests.harness.checks import SELECTOR, count_outcomes, http_status, outcomes, send

pytestmark = pytest.mark.integration

ACCOUNT = "dispatcher"
# This test is about authentication, not RBAC (tests/integration/test_chart.py pins
# the chart's Role): the account may do anything, in its own namespace only.
ANYTHING_HERE = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
REJECTED = "API server rejected our credentials (401)"


def grant_anything_here(kube: Any, namespace: str) -> None:
    core = k8s.CoreV1Api(kube.api_client())
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client())
    core.create_namespaced_service_account(namespace, {"metadata": {"name": ACCOUNT}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": ACCOUNT},
                                            "rules": ANYTHING_HERE})  # fmt: skip
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": ACCOUNT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
    })  # fmt: skip


def issue_token(kube: Any, namespace: str, token_file: Path, *, secret: str) -> None:
    """A token bound to a new Secret ``secret``, written the way the kubelet writes a
    projected token: whole, by a rename."""
    k8s.CoreV1Api(kube.api_client()).create_namespaced_secret(
        namespace, {"metadata": {"name": secret}})
    token = kube.service_account_token(namespace=namespace, name=ACCOUNT, bound_secret=secret)
    partial = token_file.with_suffix(".new")
    partial.write_text(token)
    os.replace(partial, token_file)


def answer(kubeconfig: Path, namespace: str) -> int:
    """What the API server says to the token now in the file: 200, 401 or 403."""
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        try:
            k8s.BatchV1Api(api).list_namespaced_job(namespace, limit=1)
        except k8s.ApiException as error:
            return int(error.status)
    return 200


def test_a_revoked_token_holds_runs_in_the_broker_until_the_file_has_a_valid_one(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    namespace: str, kube: Any, tmp_path: Path,
) -> None:
    grant_anything_here(kube, namespace)
    token_file = tmp_path / "token"
    issue_token(kube, namespace, token_file, secret="token-1")
    kubeconfig = kube.token_file_kubeconfig(token_file=token_file, name=f"{namespace}-tokenfile")
    # RBAC reaches the authorizer through its informer: allow a moment.
    wait_until(lambda: answer(kubeconfig, namespace) == 200, timeout=15, what="the Role")
    port = free_port()
    proc = start_dispatcher(kubeconfig=kubeconfig, http_port=port)
    wait_until(lambda: http_status(port, "/readyz") == 200, timeout=60, what="ready")

    def runs(numbers: range) -> None:
        for run in numbers:  # one RB each: they reduce side by side
            send(stomp, broker_settings, run_message(
                facility=facility, instrument="WISH", rb=3100000 + run, run=run,
                script=SLEEPY_SCRIPT))  # fmt: skip

    runs(range(1, 3))
    reader.wait_for(count_outcomes(broker_settings, 2), timeout=120)

    # Revoke the token; the API server may accept it for a few seconds from its cache.
    k8s.CoreV1Api(kube.api_client()).delete_namespaced_secret("token-1", namespace)
    wait_until(lambda: answer(kubeconfig, namespace) == 401, timeout=30, what="a 401")
    runs(range(3, 6))
    wait_until(lambda: REJECTED in proc.log(), timeout=60, what="the 401 said in the log")
    wait_until(lambda: http_status(port, "/readyz") == 503, timeout=30,
               what="not ready while refused")
    reader.settle(5)
    assert proc.alive()
    assert len(outcomes(reader, broker_settings, "complete")) == 2
    assert outcomes(reader, broker_settings, "error") == []
    assert outcomes(reader, broker_settings, "dead_letter") == []
    batch = k8s.BatchV1Api(kube.api_client())
    assert len(batch.list_namespaced_job(namespace, label_selector=SELECTOR).items) == 2

    # The kubelet's part: a valid token in the file. Nothing is restarted.
    issue_token(kube, namespace, token_file, secret="token-2")
    reader.wait_for(count_outcomes(broker_settings, 5), timeout=120)
    reader.settle(5)
    complete = Counter(m["run_number"] for m in outcomes(reader, broker_settings, "complete"))
    assert complete == Counter(range(1, 6)), complete  # each run once
    assert outcomes(reader, broker_settings, "error") == []
    assert outcomes(reader, broker_settings, "skipped") == []
    assert outcomes(reader, broker_settings, "dead_letter") == []
    wait_until(lambda: http_status(port, "/readyz") == 200, timeout=30, what="ready again")
    assert "accepts our credentials again" in proc.log()
    assert proc.alive() and proc.starts == 1

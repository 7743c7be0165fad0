"""The Helm chart against the real API server (and, for the install test, the node
agent and the real broker).

- every ci/*-values.yaml renders to manifests the API server accepts (server-side
  dry run with strict field validation);
- the Job the rendered template makes for a run is accepted too;
- `helm install` gives a dispatcher pod that becomes Ready under its own
  ServiceAccount (ready = broker connected and Jobs listed with that account),
  dispatches a run into a Job, rolls on `helm upgrade`, and `helm uninstall` removes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s

from dispatcher.config import load_settings
from dispatcher.identity import RunKey, job_name
from dispatcher.manifests import Arrival, load_template, render_job
from tests.conftest import QueueReader
from tests.harness.activemq import free_port
from tests.harness.product import Facility, run_message
from tests.harness.tools import helm_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "autoreduce"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
# Kinds whose CRDs a bare cluster does not have.
NEEDS_CRD = {"ServiceMonitor"}
RUNNER_PRESENT = (REPO / "runner-image" / "autoreduce_runner" / "__main__.py").exists()


def helm(
    kube: Any, *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def render(kube: Any, namespace: str, *values: Path, release: str = "ar") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for path in values:
        args += ["-f", str(path)]
    return [d for d in yaml.safe_load_all(helm(kube, *args).stdout) if d]


def ci_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def wait_for(what: str, check: Callable[[], Any], *, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# -- server-side dry run ---------------------------------------------------------------


def dry_run(kube: Any, docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    text = yaml.safe_dump_all(docs)
    return kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=text)


@pytest.mark.parametrize("values", CI_FILES, ids=ci_id)
def test_rendered_chart_passes_server_side_dry_run(kube: Any, namespace: str, values: Path) -> None:
    docs = [d for d in render(kube, namespace, values) if d["kind"] not in NEEDS_CRD]
    result = dry_run(kube, docs)
    assert result.returncode == 0, f"{values.name}:\n{result.stderr}"
    for doc in docs:
        assert f"{doc['kind'].lower()}" in result.stdout.lower()
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("values", CI_FILES, ids=ci_id)
def test_job_from_rendered_template_passes_server_side_dry_run(
    kube: Any, namespace: str, values: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(kube, namespace, values)
    settings_cm = next(
        d for d in docs if d["kind"] == "ConfigMap" and "settings.yaml" in d.get("data", {})
    )
    (tmp_path / "settings.yaml").write_text(settings_cm["data"]["settings.yaml"])
    (tmp_path / "job.yaml.j2").write_text(settings_cm["data"]["job.yaml.j2"])
    (tmp_path / "password").write_text("x")
    monkeypatch.setenv("AUTOREDUCE_BROKER__PASSWORD_FILE", str(tmp_path / "password"))
    settings = load_settings(config_file=tmp_path / "settings.yaml")
    template = load_template(tmp_path / "job.yaml.j2")
    # The default spec and every instrument override.
    for instrument in ["GEM", *settings.instruments]:
        key = RunKey(
            facility="ISIS", instrument=instrument, runs=(1234,), version=0, rb_number="1910001"
        )
        job = render_job(
            settings=settings,
            template=template,
            key=key,
            arrival=Arrival(priority=4, enqueued_ms=0, message_id="ID:x"),
        )
        result = kube.kubectl(
            "create", "--dry-run=server", "--validate=strict", "-f", "-", input=json.dumps(job)
        )
        assert result.returncode == 0, f"{values.name} {instrument}:\n{result.stderr}"
        assert "Warning" not in result.stderr, result.stderr


# -- install, dispatch, upgrade, uninstall ----------------------------------------------


def can_run_python_as(uid: int) -> bool:
    """The node agent runs pod processes as their runAsUser on this host."""
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            sys.executable,
            "-c",
            "0",
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def install_values(
    *, broker: BrokerSettings, facility: Facility, http_port: int, concurrency: int = 2
) -> dict[str, Any]:
    q = broker.queues
    values: dict[str, Any] = {
        "image": {"tag": "dev"},
        "httpPort": http_port,
        # Pods on the node agent share the host's network: two dispatcher pods at
        # once would fight over the port, so this test replaces, not surges.
        "strategy": {"type": "Recreate"},
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 1},
        "logJson": False,
        "broker": {
            "hosts": broker.hosts,
            "username": broker.username,
            "password": broker.password.get_secret_value(),
            "heartbeatMs": 2000,
            "reconnectInitialSeconds": 0.2,
            "reconnectMaxSeconds": 2,
            "queues": {
                "pending": q.pending,
                "started": q.started,
                "complete": q.complete,
                "error": q.error,
                "skipped": q.skipped,
                "deadLetter": q.dead_letter,
            },
        },
        "jobs": {"ttlSecondsAfterFinished": 3600},
        "runner": {
            "image": {"tag": "dev"},
            "resources": {
                "requests": {"cpu": "100m", "memory": "64Mi"},
                "limits": {"memory": "1Gi"},
            },
            "activeDeadlineSeconds": 300,
            "archiveVolumes": [
                {
                    "name": "archive",
                    "mountPath": "/isis",
                    "source": {"hostPath": {"path": str(facility.archive)}},
                }
            ],
            "outputVolumes": [
                {
                    "name": "output",
                    "mountPath": "/instrument",
                    "source": {"hostPath": {"path": str(facility.output)}},
                }
            ],
            "env": {"AUTOREDUCE_TIMEOUT_S": "120"},
        },
        "concurrency": concurrency,
    }
    if not can_run_python_as(10001):
        # This host's interpreter lives under /root (mode 700): the local node agent
        # can only run the dispatcher as root. Real clusters use the defaults.
        values["podSecurityContext"] = {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        values["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": False,
            "runAsUser": 0,
            "capabilities": {"drop": ["ALL"]},
        }
    if not can_run_python_as(1000):
        values["runner"]["runAsUser"] = None  # Helm: null removes the key -> image's user
        values["runner"]["runAsGroup"] = None
    return values


def dispatcher_pods(core: k8s.CoreV1Api, namespace: str, release: str) -> list[Any]:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=dispatcher"
    return [
        p
        for p in core.list_namespaced_pod(namespace, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    ]


def ready(pod: Any) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def describe_failure(kube: Any, namespace: str) -> str:
    pods = kube.kubectl("get", "pods", "-n", namespace, "-o", "wide").stdout
    events = kube.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout
    logs = []
    names = kube.kubectl(
        "get", "pods", "-n", namespace, "-o", "name", "-l", "app.kubernetes.io/component=dispatcher"
    ).stdout.split()
    for name in names:
        for extra in ((), ("--previous",)):
            out = kube.kubectl("logs", "-n", namespace, name, "--tail=40", *extra)
            logs.append(f"--- {name} {' '.join(extra)}\n{out.stdout}{out.stderr}")
        status = kube.kubectl(
            "get", "-n", namespace, name, "-o", "jsonpath={.status.containerStatuses}"
        ).stdout
        logs.append(f"--- {name} status: {status}")
    joined = "\n".join(logs)
    return f"pods:\n{pods}\nevents:\n{events[-3000:]}\ndispatcher:\n{joined}"


def test_install_dispatch_upgrade_uninstall(
    kube: Any,
    namespace: str,
    broker_settings: BrokerSettings,
    stomp: StompClient,
    reader: QueueReader,
    tmp_path: Path,
) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    facility = Facility(tmp_path / "facility").create()
    values = install_values(broker=broker_settings, facility=facility, http_port=free_port())
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    core = k8s.CoreV1Api(kube.api_client())
    batch = k8s.BatchV1Api(kube.api_client())
    apps = k8s.AppsV1Api(kube.api_client())

    installed = helm(kube, "install", release, str(CHART), "-n", namespace, "-f", str(values_file))
    # NOTES.txt tells the operator how to watch runs.
    notes = installed.stdout
    assert f"kubectl get jobs -n {namespace} -l autoreduce.io/managed=true" in notes
    assert f"kubectl logs -n {namespace} job/<name>" in notes
    assert "-l autoreduce.io/rb-number=<rb>" in notes
    try:
        # 1. The dispatcher becomes Ready: /readyz needs the broker connected and a
        # Job list from the API, made with the pod's own ServiceAccount token.
        pod = wait_for(
            "a Ready dispatcher pod",
            lambda: next((p for p in dispatcher_pods(core, namespace, release) if ready(p)), None),
            timeout=90,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_failure(kube, namespace)}") from None
    sa = pod.spec.service_account_name
    assert sa == f"{release}-autoreduce"
    assert core.read_namespaced_service_account(sa, namespace)
    first_pod = pod.metadata.name
    # The account may do what the dispatcher needs, and no more.
    who = f"system:serviceaccount:{namespace}:{sa}"
    for verb, resource in [
        ("create", "jobs.batch"),
        ("watch", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("update", "leases.coordination.k8s.io"),
        ("get", "pods --subresource=log"),
        ("create", "events.events.k8s.io"),
        ("list", "configmaps"),
    ]:
        answer = kube.kubectl(
            "auth", "can-i", verb, *resource.split(), "-n", namespace, "--as", who
        )
        assert answer.stdout.strip() == "yes", (verb, resource, answer.stdout, answer.stderr)
    for verb, resource, ns in [
        ("get", "secrets", namespace),
        ("update", "jobs.batch", namespace),
        ("delete", "configmaps", namespace),
        ("create", "pods", namespace),
        ("list", "jobs.batch", "default"),
        ("patch", "leases.coordination.k8s.io", namespace),
    ]:
        answer = kube.kubectl("auth", "can-i", verb, resource, "-n", ns, "--as", who)
        assert answer.stdout.strip() == "no", (verb, resource, ns, answer.stdout)

    # 2. A run message becomes the run's Job (and, with the runner, an outcome).
    script = (
        "def main(input_file, output_dir):\n    open(output_dir + '/out.txt', 'w').write('ok')\n"
    )
    message = run_message(
        facility=facility, instrument="MARI", rb=1920321, run=25581, script=script
    )
    stomp.send(destination=broker_settings.queues.pending, body=json.dumps(message).encode())
    name = job_name(
        RunKey(facility="ISIS", instrument="MARI", runs=(25581,), version=0, rb_number="1920321")
    )
    try:
        job = wait_for(
            f"Job {name}",
            lambda: next(
                iter(
                    batch.list_namespaced_job(
                        namespace, label_selector="autoreduce.io/rb-number=1920321"
                    ).items
                ),
                None,
            ),
            timeout=60,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_failure(kube, namespace)}") from None
    assert job.metadata.name == name
    assert job.metadata.labels["autoreduce.io/managed"] == "true"
    assert job.spec.template.spec.volumes[1].secret.secret_name == f"{release}-autoreduce-broker"
    if RUNNER_PRESENT:
        q = broker_settings.queues
        final = {q.complete, q.error, q.skipped}
        reader.wait_for(lambda seen: any(d.destination in final for d in seen), timeout=120)
        outcome = next(json.loads(d.body) for d in reader.seen if d.destination in final)
        assert outcome["run_number"] == 25581
        assert reader.bodies(q.complete), f"run did not complete: {outcome.get('message')}"

    # 3. `helm upgrade` with a changed value rolls the dispatcher (config checksum)
    # while a run waits for its RB: the waiting run survives the roll and is reduced.
    slow = "import time\ndef main(input_file, output_dir):\n    time.sleep(8)\n"
    holder = run_message(facility=facility, instrument="MARI", rb=1920322, run=25590, script=slow)
    waiter = run_message(facility=facility, instrument="MARI", rb=1920322, run=25591, script=script)
    for body in (holder, waiter):
        stomp.send(destination=broker_settings.queues.pending, body=json.dumps(body).encode())
    wait_for(
        "two Jobs of RB 1920322, one waiting",
        lambda: (
            len(
                batch.list_namespaced_job(
                    namespace, label_selector="autoreduce.io/rb-number=1920322"
                ).items
            )
            == 2
        ),
        timeout=60,
    )
    values["concurrency"] = 3
    values_file.write_text(yaml.safe_dump(values))
    helm(kube, "upgrade", release, str(CHART), "-n", namespace, "-f", str(values_file))
    try:
        new_pod = wait_for(
            "a new Ready dispatcher pod",
            lambda: next(
                (
                    p
                    for p in dispatcher_pods(core, namespace, release)
                    if ready(p) and p.metadata.name != first_pod
                ),
                None,
            ),
            timeout=120,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_failure(kube, namespace)}") from None
    settings_cm = core.read_namespaced_config_map(f"{release}-autoreduce", namespace)
    assert yaml.safe_load(settings_cm.data["settings.yaml"])["concurrency"] == 3
    assert (
        new_pod.metadata.annotations["checksum/config"]
        != pod.metadata.annotations["checksum/config"]
    )
    if RUNNER_PRESENT:
        q = broker_settings.queues
        reader.wait_for(
            lambda seen: {m["run_number"] for m in reader.bodies(q.complete)} >= {25590, 25591},
            timeout=180,
        )

    # 4. `helm uninstall` leaves no dispatcher resources behind (runs' Jobs stay:
    # they are the record of the runs, and their TTL removes them).
    helm(kube, "uninstall", release, "-n", namespace, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={release}"
    assert not apps.list_namespaced_deployment(namespace, label_selector=selector).items
    assert not core.list_namespaced_config_map(namespace, label_selector=selector).items
    assert not core.list_namespaced_secret(namespace, label_selector=selector).items
    assert not core.list_namespaced_service(namespace, label_selector=selector).items
    assert not core.list_namespaced_service_account(namespace, label_selector=selector).items
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client())
    assert not rbac.list_namespaced_role(namespace, label_selector=selector).items
    assert not rbac.list_namespaced_role_binding(namespace, label_selector=selector).items
    wait_for(
        "dispatcher pods gone", lambda: not dispatcher_pods(core, namespace, release), timeout=90
    )

"""The Helm chart against the real API server (and, for the install test, the real
node running the chart's images, and the real broker).

- every ci/*-values.yaml renders to manifests the API server accepts (server-side
  dry run with strict field validation);
- the Job the rendered template makes for a run is accepted too;
- `helm install` gives a dispatcher pod that becomes Ready under its own
  ServiceAccount (ready = broker connected and Jobs listed with that account),
  dispatches a run into a Job, rolls on `helm upgrade`, and `helm uninstall` removes it
  while keeping the runs (README "Uninstalling"), which the documented commands remove;
- that ServiceAccount may do exactly what dispatcher/kube.py calls, nothing more, and
  the operator Role gives its subjects exactly what the CLI calls;
- bad values fail `helm install` naming the value, and nothing is created.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
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
from kubernetes import config as k8s_config

from autoreduce_cli.cli import browse
from devstack.activemq import free_port
from devstack.product import Facility, run_message
from devstack.queues import QueueReader
from dispatcher.config import DEFAULT_TEMPLATE, load_settings
from dispatcher.identity import RunKey, job_name
from dispatcher.manifests import Arrival, load_template, render_job
from tests.harness.checks import stored_message
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
    # The chart carries a Job template only when the site sets its own; otherwise the
    # dispatcher uses the one built into its image.
    template_text = settings_cm["data"].get("job.yaml.j2", DEFAULT_TEMPLATE.read_text())
    (tmp_path / "job.yaml.j2").write_text(template_text)
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


def install_values(
    *, broker: BrokerSettings, identities: Any, facility: Facility, http_port: int,
    concurrency: int = 2,
) -> dict[str, Any]:
    """Values for an install on ``broker``'s hosts and queues, with the broker's two
    product identities: the dispatcher's, and the runners' of their own."""
    q = broker.queues
    values: dict[str, Any] = {
        # The chart's own image names and tags: the stack built both images from the
        # Dockerfiles and loaded them into the node's containerd.
        "httpPort": http_port,
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 1},
        "logJson": False,
        "broker": {
            "hosts": broker.hosts,
            "username": identities.dispatcher.user,
            "password": identities.dispatcher.password,
            "runner": {"username": identities.runner.user,
                       "password": identities.runner.password},
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
            # The suite's broker is stomp+ssl: the chart carries its CA as a bundle.
            **({"tls": {"enabled": True, "caBundle": broker.tls.ca_file.read_text()}}
               if broker.tls.enabled and broker.tls.ca_file is not None else {}),
        },
        "jobs": {"ttlSecondsAfterFinished": 3600},
        "runner": {
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


MANAGED = "autoreduce.io/managed=true"


def run_job_name(*, rb: int, run: int) -> str:
    return job_name(
        RunKey(facility="ISIS", instrument="MARI", runs=(run,), version=0, rb_number=str(rb))
    )


def cleanup_commands() -> list[str]:
    """The kubectl commands the chart README gives for what `helm uninstall` keeps."""
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Uninstalling", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    return [line.strip() for line in block.splitlines() if line.startswith("kubectl ")]


def test_install_dispatch_upgrade_uninstall(
    kube: Any,
    namespace: str,
    broker: Any,
    broker_settings: BrokerSettings,
    stomp: StompClient,
    reader: QueueReader,
    tmp_path: Path,
) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    facility = Facility(tmp_path / "facility").create()
    values = install_values(broker=broker_settings, identities=broker, facility=facility,
                            http_port=free_port())
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
    # ...and what `helm uninstall` keeps, with the commands that remove it.
    assert f"kubectl delete jobs -n {namespace} -l autoreduce.io/managed=true" in notes
    assert f"kubectl delete jobs -n {namespace} -l autoreduce.io/cancel=true" in notes
    assert f"kubectl delete leases -n {namespace} -l autoreduce.io/managed=true" in notes
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
    # What that account may do: test_dispatcher_account_can_do_exactly_what_it_needs.

    # 2. A run message becomes the run's Job (and, with the runner, an outcome).
    script = (
        "def main(input_file, output_dir):\n    open(output_dir + '/out.txt', 'w').write('ok')\n"
    )
    message = run_message(
        facility=facility, instrument="MARI", rb=1920321, run=25581, script=script
    )
    stomp.send(destination=broker_settings.queues.pending, body=json.dumps(message).encode())
    name = run_job_name(rb=1920321, run=25581)
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
    # Reductions mount the runners' own broker Secret, not the dispatcher's.
    (broker_volume,) = [v for v in job.spec.template.spec.volumes if v.name == "broker"]
    assert broker_volume.secret.secret_name == f"{release}-autoreduce-broker-runner"
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
        # The outcome arrives before the Job's own verdict (the pod is still stopping on
        # the node): wait for that too, so step 5 meets two finished Jobs.
        for run in (25590, 25591):
            wait_for(
                f"run {run}'s Job to succeed",
                lambda run=run: batch.read_namespaced_job(
                    run_job_name(rb=1920322, run=run), namespace
                ).status.succeeded == 1,
                timeout=60,
            )

    # 4. Runs in every state `helm uninstall` has to leave alone: one holding its RB,
    # one waiting behind it, and a cancellation whose run has not arrived (a marker).
    long = "import time\ndef main(input_file, output_dir):\n    time.sleep(600)\n"
    busy = run_message(facility=facility, instrument="MARI", rb=1920323, run=25600, script=long)
    queued = run_message(facility=facility, instrument="MARI", rb=1920323, run=25601, script=script)
    early = run_message(facility=facility, instrument="MARI", rb=1920324, run=25610, script=script)
    busy_name = run_job_name(rb=1920323, run=25600)
    queued_name = run_job_name(rb=1920323, run=25601)
    marker_name = run_job_name(rb=1920324, run=25610)
    # The busy run first, on its own: with two consumer workers, two messages sent
    # together may be stored in either order, and then the quick one would hold the RB.
    stomp.send(destination=broker_settings.queues.pending, body=json.dumps(busy).encode())
    wait_for(f"{busy_name} to be stored", lambda: busy_name in {
        j.metadata.name for j in batch.list_namespaced_job(namespace).items}, timeout=60)
    for body in (queued, {**early, "cancel": True}):
        stomp.send(destination=broker_settings.queues.pending, body=json.dumps(body).encode())

    def held_waiting_and_marked() -> bool:
        jobs = {j.metadata.name: j for j in batch.list_namespaced_job(namespace).items}
        return (
            busy_name in jobs
            and not jobs[busy_name].spec.suspend
            and queued_name in jobs
            and marker_name in jobs
        )

    try:
        wait_for(
            "RB 1920323 held, a run waiting, a cancel marker", held_waiting_and_marked, timeout=60
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_failure(kube, namespace)}") from None

    # 5. `helm uninstall` leaves no dispatcher resources behind...
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

    # ...and keeps what the README says it keeps: the runs.
    finished = [name] + [run_job_name(rb=1920322, run=run) for run in (25590, 25591)]
    kept = {
        j.metadata.name: j
        for j in batch.list_namespaced_job(namespace, label_selector=MANAGED).items
    }
    assert set(kept) == {*finished, busy_name, queued_name}, sorted(kept)
    assert kept[queued_name].spec.suspend is True  # still waiting, for a reinstall to admit
    for job_name_ in finished:
        # Finished Jobs go when their TTL says, not with the release.
        assert kept[job_name_].spec.ttl_seconds_after_finished == 3600
        if RUNNER_PRESENT:
            assert kept[job_name_].status.succeeded == 1, job_name_
    # Each run's message stays with its Job (small messages travel in it: no ConfigMap).
    assert not core.list_namespaced_config_map(namespace, label_selector=MANAGED).items
    for job_name_, job in kept.items():
        message = stored_message(batch.api_client, namespace, job_name_)
        assert message is not None, job_name_
        assert str(message["run_number"]) == job.metadata.labels["autoreduce.io/run-number"]
    coordination = k8s.CoordinationV1Api(kube.api_client())
    leases = coordination.list_namespaced_lease(namespace, label_selector=MANAGED).items
    assert [(lease.metadata.name, lease.spec.holder_identity) for lease in leases] == [
        ("rb-1920323", busy_name)
    ]
    markers = batch.list_namespaced_job(namespace, label_selector="autoreduce.io/cancel=true")
    assert [(j.metadata.name, j.spec.suspend) for j in markers.items] == [(marker_name, True)]

    # 6. The README's commands remove all of it (pods and ConfigMaps with their Jobs).
    commands = cleanup_commands()
    assert {c.split(" -l ")[0].split(" -n ")[0] for c in commands} >= {
        "kubectl delete jobs",
        "kubectl delete leases",
    }
    for command in commands:
        text = command.replace("<ns>", namespace)
        if "|" in text:  # a pipeline: run it as the README reader's shell would
            env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig),
                   "PATH": f"{Path(kube.kubectl_binary).parent}:{os.environ['PATH']}"}
            result = subprocess.run(["bash", "-c", text], capture_output=True, text=True,
                                    env=env, timeout=120, check=False)
        else:
            result = kube.kubectl(*shlex.split(text)[1:])
        assert result.returncode == 0, f"{command}:\n{result.stderr}"

    def leftovers() -> list[str]:
        names = [
            f"job/{j.metadata.name}"
            for selector in (MANAGED, "autoreduce.io/cancel=true")
            for j in batch.list_namespaced_job(namespace, label_selector=selector).items
        ]
        names += [
            f"configmap/{c.metadata.name}"
            for c in core.list_namespaced_config_map(namespace, label_selector=MANAGED).items
        ]
        names += [
            f"lease/{lease.metadata.name}"
            for lease in coordination.list_namespaced_lease(namespace, label_selector=MANAGED).items
        ]
        names += [
            f"pod/{p.metadata.name}"
            for p in core.list_namespaced_pod(namespace, label_selector=MANAGED).items
        ]
        return names

    wait_for("nothing of the runs left", lambda: not leftovers(), timeout=120)


# -- helm test: the canary ---------------------------------------------------------------


def helm_test(kube: Any, release: str, namespace: str) -> tuple[int, str]:
    """`helm test` and what it and the canary pod said."""
    # No --logs: Helm fetches the logs of Pod hooks only (a Job's fail it).
    result = helm(kube, "test", release, "-n", namespace, "--timeout", "5m",
                  check=False, timeout=360)  # fmt: skip
    job = f"job/{release}-autoreduce-canary"  # the README's command for its log
    logs = kube.kubectl("logs", "-n", namespace, job).stdout
    return result.returncode, f"{result.stdout}\n{result.stderr}\n--- {job}:\n{logs}"


def canary_outcomes(reader: QueueReader, queue: str) -> list[dict[str, Any]]:
    return [b for b in reader.bodies(queue) if b.get("instrument") == "CANARY"]


def test_helm_test_canary_passes_and_leaves_the_outcome_to_the_web_app(
    kube: Any, namespace: str, broker: Any, broker_settings: BrokerSettings, tmp_path: Path
) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    facility = Facility(tmp_path / "facility").create()
    values = install_values(broker=broker_settings, identities=broker, facility=facility,
                            http_port=free_port())
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(kube, "install", release, str(CHART), "-n", namespace, "-f", str(values_file),
         "--wait", "--timeout", "3m", timeout=240)  # fmt: skip
    q = broker_settings.queues

    # 1. Nobody consumes the outcome queues: the canary finds its outcome by browsing...
    code, said = helm_test(kube, release, namespace)
    assert code == 0, f"{said}\n{describe_failure(kube, namespace)}"
    assert "canary passed: ReductionSkipped came back" in said, said
    assert "SKIP_RUNS" in said, said
    # ...and leaves it where it was, for the web app: one Skipped, nothing else final.
    web_app = QueueReader(broker_settings)
    try:
        for queue in (q.started, q.complete, q.error, q.skipped):
            web_app.watch(queue)
        web_app.wait_for(lambda _: len(canary_outcomes(web_app, q.skipped)) == 1, timeout=30)
        web_app.settle(2)
        assert len(canary_outcomes(web_app, q.started)) == 1
        assert canary_outcomes(web_app, q.complete) == canary_outcomes(web_app, q.error) == []

        # 2. With a consumer acking every outcome the moment it arrives (as the web app
        # does), the canary still passes, on the runner's broker-confirmed termination
        # report. (A browser also sees delivered-but-unacked messages, so a slower
        # consumer leaves the message evidence; so may a browse inside the ack's window.)
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                web_app.settle(0.2)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        try:
            code, said = helm_test(kube, release, namespace)
        finally:
            stop.set()
            consumer.join(timeout=10)
        print(said)  # which evidence the canary used (pytest -rP shows it)
        assert code == 0, f"{said}\n{describe_failure(kube, namespace)}"
        assert ("canary passed: ReductionSkipped posted (the broker confirmed it to the runner)"
                " and taken by another consumer" in said
                or "canary passed: ReductionSkipped came back" in said), said
        web_app.wait_for(lambda _: len(canary_outcomes(web_app, q.skipped)) == 2, timeout=30)
    finally:
        web_app.close()


def test_helm_test_fails_clearly_when_no_outcome_can_come_back(
    kube: Any, namespace: str, broker: Any, broker_settings: BrokerSettings, stomp: StompClient,
    tmp_path: Path,
) -> None:  # fmt: skip
    release = f"ar-{uuid.uuid4().hex[:6]}"
    facility = Facility(tmp_path / "facility").create()
    values = install_values(broker=broker_settings, identities=broker, facility=facility,
                            http_port=free_port())
    values["replicaCount"] = 0  # no dispatcher: the run cannot become a Job
    values["helmTest"] = {"timeoutSeconds": 8}
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(kube, "install", release, str(CHART), "-n", namespace, "-f", str(values_file))

    code, said = helm_test(kube, release, namespace)
    assert code != 0, said
    assert "canary FAILED: no outcome for the canary run after 8 s: no Job red-canary-" in said
    assert "no dispatcher took the run from" in said, said
    assert "the run was withdrawn from the queue" in said, said
    # Withdrawn: a dispatcher started later finds no stale canary run.
    assert browse(stomp, broker_settings.queues.pending) == []


# -- RBAC: the dispatcher's ServiceAccount ---------------------------------------------

# (verb, resource, subresource): every call dispatcher/kube.py makes from the dispatcher,
# with the Kube method that makes it (the operator CLI has a Role of its own, below).
ALLOWED = [
    ("create", "jobs.batch", ""),  # create_job (and the cancel markers), dry_run_job
    ("get", "jobs.batch", ""),  # get_job: after a 409, to confirm a Lease holder
    ("list", "jobs.batch", ""),  # list_jobs: rebuild state, resync
    ("watch", "jobs.batch", ""),  # watch_jobs: admission is watch-driven
    ("patch", "jobs.batch", ""),  # set_suspend, annotate_job (merge patches)
    ("delete", "jobs.batch", ""),  # delete_job: cancellations, pods that cannot start
    ("update", "jobs.batch", "finalizers"),  # blockOwnerDeletion on the message ConfigMap
    ("create", "configmaps", ""),  # create_config_map: the run's message
    ("get", "configmaps", ""),  # get_config_map: the message, for an outcome
    ("create", "leases.coordination.k8s.io", ""),  # create_lease: take a free RB
    ("get", "leases.coordination.k8s.io", ""),  # get_lease
    ("update", "leases.coordination.k8s.io", ""),  # replace_lease: compare-and-swap
    ("delete", "leases.coordination.k8s.io", ""),  # delete_lease: release the RB
    ("list", "pods", ""),  # list_pods: why a run died, stuck image pulls
    ("watch", "pods", ""),  # watch_pods: a stopping pod holds its RB
    ("patch", "pods", ""),  # remove_pod_finalizer: the run's outcome is settled
    ("get", "pods", "log"),  # pod_log_tail: the end of a dead runner's log
    ("create", "events.events.k8s.io", ""),  # record_event
]
# Nearby rights it must not have in its own namespace.
DENIED = [
    ("update", "jobs.batch", ""),  # every Job change is a patch
    ("deletecollection", "jobs.batch", ""),
    ("update", "jobs.batch", "status"),
    ("patch", "jobs.batch", "status"),
    ("create", "cronjobs.batch", ""),
    ("list", "configmaps", ""),
    ("watch", "configmaps", ""),
    ("update", "configmaps", ""),
    ("patch", "configmaps", ""),
    ("delete", "configmaps", ""),  # they go with their Job (garbage collector)
    ("patch", "leases.coordination.k8s.io", ""),  # would bypass the compare-and-swap
    ("list", "leases.coordination.k8s.io", ""),  # read by name; only the CLI lists them
    ("watch", "leases.coordination.k8s.io", ""),
    ("deletecollection", "leases.coordination.k8s.io", ""),
    ("get", "pods", ""),
    ("update", "pods", ""),
    ("create", "pods", ""),
    ("delete", "pods", ""),
    ("create", "pods", "exec"),
    ("get", "secrets", ""),  # the broker password is a mounted file
    ("list", "secrets", ""),
    ("watch", "secrets", ""),
    ("create", "secrets", ""),
    ("create", "events", ""),  # the core/v1 Events API: it uses events.k8s.io
    ("list", "events.events.k8s.io", ""),
    ("patch", "events.events.k8s.io", ""),
    ("create", "serviceaccounts", "token"),
    ("patch", "deployments.apps", ""),
    ("create", "roles.rbac.authorization.k8s.io", ""),
    ("create", "rolebindings.rbac.authorization.k8s.io", ""),
]
# Other namespaces and cluster-scoped resources: nothing at all.
DENIED_ELSEWHERE = [
    ("list", "jobs.batch", ""),  # all namespaces
    ("list", "jobs.batch", "default"),
    ("create", "jobs.batch", "kube-system"),
    ("create", "leases.coordination.k8s.io", "default"),
    ("get", "configmaps", "kube-system"),
    ("list", "nodes", ""),
    ("list", "namespaces", ""),
    ("create", "namespaces", ""),
    ("create", "priorityclasses.scheduling.k8s.io", ""),
    ("create", "clusterroles.rbac.authorization.k8s.io", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
]


def can_i(
    kube: Any,
    *,
    account: tuple[str, str],
    verb: str,
    resource: str,
    subresource: str = "",
    namespace: str | None = None,
) -> str:
    """`kubectl auth can-i` as the ServiceAccount, with the groups its token carries."""
    ns, name = account
    args = ["auth", "can-i", verb, resource]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    args += ["--as", f"system:serviceaccount:{ns}:{name}"]
    for group in ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"):
        args += ["--as-group", group]
    answer = kube.kubectl(*args)
    assert answer.stdout.strip() in ("yes", "no"), (args, answer.stdout, answer.stderr)
    return answer.stdout.strip()


def granted_rules(kube: Any, *, namespace: str, account: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the account may use in ``namespace``, as its own token
    sees them (SelfSubjectRulesReview: what `kubectl auth can-i --list` shows)."""
    config_file = kube.service_account_kubeconfig(namespace=namespace, name=account)
    with k8s_config.new_client_from_config(config_file=str(config_file)) as api:
        review = k8s.AuthorizationV1Api(api).create_self_subject_rules_review(
            {"spec": {"namespace": namespace}}
        )
    return {
        (group, resource, verb)
        for rule in review.status.resource_rules
        if not rule.resource_names
        for group in rule.api_groups or [""]
        for resource in rule.resources or []
        for verb in rule.verbs
    }


def test_dispatcher_account_can_do_exactly_what_it_needs(kube: Any, namespace: str) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    # No dispatcher pod needed: RBAC is about the account, not the process.
    helm(
        kube, "install", release, str(CHART), "-n", namespace,
        "--set", "broker.password=x", "--set", "replicaCount=0",
    )  # fmt: skip
    account = (namespace, f"{release}-autoreduce")
    # RBAC reaches the authorizer through its informer: allow a moment.
    wait_for(
        "the Role to apply",
        lambda: can_i(kube, account=account, verb="create", resource="jobs.batch",
                      namespace=namespace) == "yes",
        timeout=15,
    )  # fmt: skip
    wrong = []
    for expected, checks in (("yes", ALLOWED), ("no", DENIED)):
        for verb, resource, subresource in checks:
            answer = can_i(
                kube, account=account, verb=verb, resource=resource, subresource=subresource,
                namespace=namespace,
            )  # fmt: skip
            if answer != expected:
                wrong.append(f"{verb} {resource} {subresource}: {answer}, want {expected}")
    for verb, resource, ns in DENIED_ELSEWHERE:
        answer = can_i(kube, account=account, verb=verb, resource=resource, namespace=ns or None)
        if answer != "no":
            wrong.append(f"{verb} {resource} in {ns or 'all namespaces'}: {answer}, want no")
    assert not wrong, "\n".join(wrong)

    # Exhaustive: the account's rules, minus what every account in the namespace gets
    # (discovery, self reviews), are exactly the allowed list.
    own = granted_rules(kube, namespace=namespace, account=account[1])
    baseline = granted_rules(kube, namespace=namespace, account="default")
    expected = {
        (
            resource.split(".", 1)[1] if "." in resource else "",
            resource.split(".", 1)[0] + (f"/{subresource}" if subresource else ""),
            verb,
        )
        for verb, resource, subresource in ALLOWED
    }
    assert own - baseline == expected


# -- RBAC: the operator Role ----------------------------------------------------------

# Every call autoreduce_cli/cli.py makes through dispatcher/kube.py (without
# operatorRole.serverDryRun), with the Kube method.
OPERATOR_ALLOWED = [
    ("get", "jobs.batch", ""),  # get_job: following a run
    ("list", "jobs.batch", ""),  # list_jobs: status, retry's next version
    ("list", "pods", ""),  # list_pods: status, a run told from its pods
    ("get", "configmaps", ""),  # get_config_map: retry
    ("get", "leases.coordination.k8s.io", ""),  # get_lease: a followed run that waits
    ("list", "leases.coordination.k8s.io", ""),  # list_leases: status
]
OPERATOR_DENIED = [
    ("create", "jobs.batch", ""),  # only with operatorRole.serverDryRun
    ("patch", "jobs.batch", ""),
    ("delete", "jobs.batch", ""),
    ("watch", "jobs.batch", ""),
    ("get", "pods", "log"),
    ("create", "pods", "exec"),
    ("list", "configmaps", ""),
    ("create", "leases.coordination.k8s.io", ""),
    ("update", "leases.coordination.k8s.io", ""),
    ("delete", "leases.coordination.k8s.io", ""),
    ("get", "secrets", ""),
]


def test_operator_role_grants_what_the_cli_needs_to_its_subjects_only(
    kube: Any, namespace: str
) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    # A ServiceAccount subject: can_i impersonates it (it need not exist for RBAC).
    helm(
        kube, "install", release, str(CHART), "-n", namespace,
        "--set", "broker.password=x", "--set", "replicaCount=0",
        "--set", "operatorRole.subjects[0].kind=ServiceAccount",
        "--set", "operatorRole.subjects[0].name=operator",
    )  # fmt: skip
    operator = (namespace, "operator")
    wait_for(
        "the operator RoleBinding to apply",
        lambda: can_i(kube, account=operator, verb="list", resource="leases.coordination.k8s.io",
                      namespace=namespace) == "yes",
        timeout=15,
    )  # fmt: skip
    wrong = []
    for expected, checks in (("yes", OPERATOR_ALLOWED), ("no", OPERATOR_DENIED)):
        for verb, resource, subresource in checks:
            answer = can_i(
                kube, account=operator, verb=verb, resource=resource, subresource=subresource,
                namespace=namespace,
            )  # fmt: skip
            if answer != expected:
                wrong.append(f"{verb} {resource} {subresource}: {answer}, want {expected}")
    # The dispatcher's own account is not a subject: still no list on Leases.
    dispatcher = (namespace, f"{release}-autoreduce")
    answer = can_i(kube, account=dispatcher, verb="list", resource="leases.coordination.k8s.io",
                   namespace=namespace)  # fmt: skip
    if answer != "no":
        wrong.append(f"the dispatcher may list leases: {answer}")
    assert not wrong, "\n".join(wrong)


# -- bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        (("replicaCuont=2",), ("replicaCuont",)),  # an unknown key
        (("caps.maxRunning=-1",), ("'/caps/maxRunning'", "got -1")),  # a negative cap
        (("image.repository=null",), ("'/image'", "'repository'")),  # a missing image
        (("runner.image.repository=",), ("'/runner/image/repository'",)),  # an empty one
    ],
    ids=["unknown-key", "negative-cap", "missing-image", "empty-runner-image"],
)
def test_bad_values_fail_helm_install_and_create_nothing(
    kube: Any, namespace: str, sets: tuple[str, ...], names: tuple[str, ...]
) -> None:
    release = f"ar-{uuid.uuid4().hex[:6]}"
    # priorityClass.create: a cluster-scoped object would be created too.
    args = ["install", release, str(CHART), "-n", namespace]
    for item in ("broker.password=x", "priorityClass.create=true", *sets):
        args += ["--set", item]
    result = helm(kube, *args, check=False)
    assert result.returncode != 0, result.stdout
    assert "INSTALLATION FAILED" in result.stderr, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    # No release record, and no object of the release in the namespace or the cluster.
    assert helm(kube, "list", "-n", namespace, "--all", "-q").stdout.strip() == ""
    assert helm(kube, "status", release, "-n", namespace, check=False).returncode != 0
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "all,configmaps,secrets,serviceaccounts,roles,rolebindings,poddisruptionbudgets"
    objects = kube.kubectl("get", f"{kinds},networkpolicies", "-n", namespace, "-l", selector,
                           "-o", "name")  # fmt: skip
    assert objects.returncode == 0 and objects.stdout.strip() == "", objects.stdout
    cluster = kube.kubectl("get", "priorityclasses", "-l", selector, "-o", "name")
    assert cluster.returncode == 0 and cluster.stdout.strip() == "", cluster.stdout
    secrets = kube.kubectl("get", "secrets", "-n", namespace, "-l", "owner=helm", "-o", "name")
    assert secrets.stdout.strip() == "", secrets.stdout

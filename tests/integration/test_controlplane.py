"""The local Kubernetes stack itself: real apiserver, controller-manager, scheduler
and a real kubelet on containerd running the runner image. These pin down what the
product's tests rely on."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from devstack.images import DISPATCHER, RUNNER, product_version
from devstack.paths import repo_root
from tests.conftest import needs_own_component

pytestmark = pytest.mark.integration

# The runner image the stack built (it has python and sh), as every node has it.
IMAGE = RUNNER.tag(product_version(repo_root()))
DISPATCHER_IMAGE = DISPATCHER.tag(product_version(repo_root()))


@pytest.fixture
def api(kube: Any) -> Iterator[client.ApiClient]:
    with kube.api_client() as c:
        yield c


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def batch(api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api)


def wait_for(
    what: str, check: Callable[[], Any], *, timeout: float = 30.0, every: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def container(command: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": "main", "image": IMAGE, "command": command, **extra}


def job_body(name: str, command: list[str], *, spec: dict[str, Any] | None = None,
             pod: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [container(command, **extra)],
                         **(pod or {})},
            },
            **(spec or {}),
        },
    }  # fmt: skip


def pod_body(name: str, command: list[str], *, pod: dict[str, Any] | None = None,
             **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container(command, **extra)],
                 **(pod or {})},
    }  # fmt: skip


def job_condition(batch: client.BatchV1Api, ns: str, name: str, kind: str) -> Any:
    job = batch.read_namespaced_job_status(name, ns)
    return next(
        (c for c in job.status.conditions or [] if c.type == kind and c.status == "True"), None
    )


def job_pods(core: client.CoreV1Api, ns: str, name: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items)


def finished_pod(core: client.CoreV1Api, ns: str, name: str, timeout: float = 30) -> client.V1Pod:
    return wait_for(
        f"pod {name} to finish",
        lambda: (
            (p := core.read_namespaced_pod(name, ns)).status.phase in ("Succeeded", "Failed") and p
        ),
        timeout=timeout,
    )


def pod_log(core: client.CoreV1Api, ns: str, name: str) -> str:
    return str(core.read_namespaced_pod_log(name, ns, container="main"))


# -- Jobs --------------------------------------------------------------------------------


def test_job_completes_and_logs_go_through_apiserver(
    kube: Any, namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    batch.create_namespaced_job(
        namespace, job_body("hello", ["sh", "-c", "echo hello from $HOSTNAME; echo err >&2"])
    )
    wait_for("Complete", lambda: job_condition(batch, namespace, "hello", "Complete"))
    (pod,) = job_pods(core, namespace, "hello")
    assert pod.status.phase == "Succeeded"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    text = pod_log(core, namespace, pod.metadata.name)
    assert f"hello from {pod.metadata.name}" in text and "err" in text
    out = kube.kubectl("logs", "-n", namespace, "job/hello")
    assert out.returncode == 0, out.stderr
    assert f"hello from {pod.metadata.name}" in out.stdout


def test_ttl_after_finished_controller_deletes_finished_jobs(
    namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    # Our finished reduction Jobs (and, through ownership, their ConfigMaps and pods)
    # rely on this controller to go away.
    batch.create_namespaced_job(
        namespace, job_body("brief", ["sh", "-c", "true"], spec={"ttlSecondsAfterFinished": 1})
    )
    wait_for("Complete", lambda: job_condition(batch, namespace, "brief", "Complete"))

    def gone() -> bool:
        names = [j.metadata.name for j in batch.list_namespaced_job(namespace).items]
        return "brief" not in names and not job_pods(core, namespace, "brief")

    wait_for("the Job deleted by its TTL, pods with it", gone, timeout=60)


def test_failing_job_reports_exit_code(
    namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    batch.create_namespaced_job(namespace, job_body("fails", ["sh", "-c", "echo bye; exit 3"]))
    wait_for("Failed", lambda: job_condition(batch, namespace, "fails", "Failed"))
    (pod,) = job_pods(core, namespace, "fails")
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error")


def test_job_active_deadline_kills_pod(
    namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    # sleep as PID 1 ignores SIGTERM: without a short grace the kill waits the 30 s default.
    body = job_body("slow", ["sleep", "300"], spec={"activeDeadlineSeconds": 2},
                    pod={"terminationGracePeriodSeconds": 1})
    batch.create_namespaced_job(namespace, body)
    cond = wait_for("Failed", lambda: job_condition(batch, namespace, "slow", "Failed"), timeout=40)
    assert cond.reason == "DeadlineExceeded"
    wait_for(
        "the pod to go",
        lambda: (
            not job_pods(core, namespace, "slow")
            or all(p.status.phase == "Failed" for p in job_pods(core, namespace, "slow"))
        ),
    )


def test_a_pods_deadline_in_a_job_keeps_the_pod_and_its_termination_message(
    namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    # How our Jobs set their time limit (dispatcher/templates/job.yaml.j2): the kubelet
    # ends the pod but does not delete it, so the report the runner writes on SIGTERM
    # survives (a Job deadline deletes the pod, and a deleted pod's report can be lost
    # to ContainerStatusUnknown); the Job then fails for its backoff limit.
    script = ("trap 'echo stopped-report > /dev/termination-log; exit 4' TERM; "
              "while :; do sleep 0.2; done")
    body = job_body("podlimit", ["sh", "-c", script],
                    pod={"activeDeadlineSeconds": 2, "terminationGracePeriodSeconds": 10})
    batch.create_namespaced_job(namespace, body)
    cond = wait_for("Failed", lambda: job_condition(batch, namespace, "podlimit", "Failed"),
                    timeout=60)
    assert cond.reason == "BackoffLimitExceeded"
    (pod,) = job_pods(core, namespace, "podlimit")
    assert (pod.status.phase, pod.status.reason) == ("Failed", "DeadlineExceeded")
    assert pod.metadata.deletion_timestamp is None
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, (term.message or "").strip()) == (4, "stopped-report")


def test_termination_message_from_file(namespace: str, core: client.CoreV1Api) -> None:
    script = "echo done-message > /dev/termination-log; exit 1"
    core.create_namespaced_pod(
        namespace,
        pod_body("msg", ["sh", "-c", script], pod={"securityContext": {"runAsUser": 1000}}),
    )
    pod = finished_pod(core, namespace, "msg")
    assert pod.status.container_statuses[0].state.terminated.message.strip() == "done-message"


def test_suspended_job_starts_only_when_unsuspended(
    namespace: str, batch: client.BatchV1Api, core: client.CoreV1Api
) -> None:
    batch.create_namespaced_job(namespace, job_body("later", ["true"], spec={"suspend": True}))
    time.sleep(1.5)
    assert job_pods(core, namespace, "later") == []
    t0 = time.monotonic()
    batch.patch_namespaced_job("later", namespace, {"spec": {"suspend": False}})
    wait_for(
        "a running pod",
        lambda: any(
            p.status.phase in ("Running", "Succeeded") for p in job_pods(core, namespace, "later")
        ),
        timeout=10,
    )
    assert time.monotonic() - t0 < 10
    wait_for("Complete", lambda: job_condition(batch, namespace, "later", "Complete"))


# -- API server behaviour ------------------------------------------------------------------


def test_rbac_service_account_needs_a_role(
    kube: Any, namespace: str, core: client.CoreV1Api, api: client.ApiClient
) -> None:
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "dispatcher"}})
    sa_config = kube.service_account_kubeconfig(namespace=namespace, name="dispatcher")
    with config.new_client_from_config(config_file=str(sa_config)) as sa_api:
        sa_batch = client.BatchV1Api(sa_api)
        with pytest.raises(client.ApiException) as denied:
            sa_batch.create_namespaced_job(namespace, job_body("nope", ["true"]))
        assert denied.value.status == 403
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(namespace, {
            "metadata": {"name": "jobs"},
            "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get"]}],
        })  # fmt: skip
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "jobs"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "jobs"},
            "subjects": [{"kind": "ServiceAccount", "name": "dispatcher", "namespace": namespace}],
        })  # fmt: skip
        # RBAC changes reach the authorizer through its informer: allow a moment.
        wait_for("the role to apply", lambda: _try_create(sa_batch, namespace), timeout=10)


def _try_create(batch: client.BatchV1Api, ns: str) -> bool:
    try:
        batch.create_namespaced_job(ns, job_body("yes", ["true"]))
        return True
    except client.ApiException as exc:
        if exc.status != 403:
            raise
        return False


def test_server_side_dry_run_rejects_invalid_job(namespace: str, batch: client.BatchV1Api) -> None:
    body = job_body("Bad_Name", ["true"])
    body["spec"]["template"]["spec"]["restartPolicy"] = "Always"  # invalid for a Job too
    with pytest.raises(client.ApiException) as rejected:
        batch.create_namespaced_job(namespace, body, dry_run="All")
    assert rejected.value.status == 422
    batch.create_namespaced_job(namespace, job_body("fine", ["true"]), dry_run="All")
    assert batch.list_namespaced_job(namespace).items == []


# -- volumes, env, tokens ------------------------------------------------------------------


def test_configmap_volume_and_env_sources(
    namespace: str, core: client.CoreV1Api, tmp_path: Path
) -> None:
    core.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "cfg"}, "data": {"settings.yaml": "a: 1\n", "MODE": "fast"}},
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "sec"}, "stringData": {"pw": "s3cret"}}
    )
    host = tmp_path / "host"
    host.mkdir()
    (host / "data.txt").write_text("from host\n")
    script = (
        "cat /etc/app/settings.yaml; cat /data/data.txt; echo secret-file=$(cat /etc/sec/pw); "
        "touch /data/new 2>/dev/null && echo WRITABLE || echo READONLY; "
        'echo "mode=$MODE pw=$PW pod=$POD ns=$NS node=$NODE lbl=$LBL"'
    )
    env = [
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "LBL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
    ]
    body = pod_body(
        "vols", ["sh", "-c", script], env=env,
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/app"},
                      {"name": "sec", "mountPath": "/etc/sec", "readOnly": True},
                      {"name": "host", "mountPath": "/data", "readOnly": True}],
        pod={"volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                         {"name": "sec", "secret": {"secretName": "sec"}},
                         {"name": "host", "hostPath": {"path": str(host)}}]},
    )  # fmt: skip
    body["metadata"]["labels"] = {"app": "demo"}
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "vols")
    text = pod_log(core, namespace, "vols")
    assert pod.status.phase == "Succeeded", text
    assert "a: 1" in text and "from host" in text and "READONLY" in text
    assert "secret-file=s3cret" in text
    node = pod.spec.node_name
    assert f"mode=fast pw=s3cret pod=vols ns={namespace} node={node} lbl=demo" in text
    assert not (host / "new").exists()


TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_service_account_token_mounted_and_usable(namespace: str, core: client.CoreV1Api) -> None:
    script = (
        "import os, kubernetes as k\n"
        "k.config.load_incluster_config()\n"
        f"print('ns-file', open('{TOKEN}/namespace').read())\n"
        "api = k.client.CoreV1Api()\n"
        "try:\n"
        "    api.list_namespaced_pod(os.environ['NS'])\n"
        "except k.client.ApiException as e:\n"
        "    print('status', e.status)\n"
    )
    env = [{"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    body = pod_body("tok", ["python", "-c", script], env=env)
    body["spec"]["containers"][0]["image"] = DISPATCHER_IMAGE  # it has the kubernetes client
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "tok")
    text = pod_log(core, namespace, "tok")
    assert pod.status.phase == "Succeeded", text
    # Authenticated as the pod's service account (no Role: 403, not 401).
    assert f"ns-file {namespace}" in text and "status 403" in text


def test_no_token_when_automount_disabled(namespace: str, core: client.CoreV1Api) -> None:
    body = pod_body("notok", ["sh", "-c", f"ls {TOKEN}/token && echo HAS || echo NONE"],
                    pod={"automountServiceAccountToken": False})  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    finished_pod(core, namespace, "notok")
    assert "NONE" in pod_log(core, namespace, "notok")


# -- kubelet behaviour ---------------------------------------------------------------------


def test_memory_limit_gives_oomkilled(namespace: str, core: client.CoreV1Api) -> None:
    # Touch every page so the memory is resident, then hold it.
    script = (
        "import time\nx = bytearray(300 << 20)\nx[::4096] = b'1' * len(x[::4096])\ntime.sleep(30)"
    )
    body = pod_body("oom", ["python", "-c", script], resources={"limits": {"memory": "100Mi"}})
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "oom")
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.reason, term.exit_code) == ("Failed", "OOMKilled", 137)


def test_unknown_image_is_image_pull_backoff(namespace: str, core: client.CoreV1Api) -> None:
    body = pod_body("noimg", ["true"])
    body["spec"]["containers"][0]["image"] = "registry.invalid/nothing:1"
    core.create_namespaced_pod(namespace, body)

    def reason() -> str | None:
        pod = core.read_namespaced_pod("noimg", namespace)
        statuses = pod.status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return waiting.reason if waiting and waiting.reason == "ImagePullBackOff" else None

    # The node has no registry to reach: the pull fails (DNS), then the kubelet backs off.
    wait_for("ImagePullBackOff", reason, timeout=90, every=0.5)
    assert core.read_namespaced_pod("noimg", namespace).status.phase == "Pending"


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_deleting_a_pod_kills_its_process(namespace: str, core: client.CoreV1Api) -> None:
    marker = uuid.uuid4().hex
    core.create_namespaced_pod(
        namespace, pod_body("victim", ["sh", "-c", f"echo $$; sleep 300; : {marker}"])
    )
    wait_for(
        "running", lambda: core.read_namespaced_pod("victim", namespace).status.phase == "Running"
    )
    pids = wait_for("the sleep", lambda: _pids_with(marker))
    core.delete_namespaced_pod("victim", namespace, grace_period_seconds=5)
    wait_for("the pod to be gone", lambda: _gone(core, namespace, "victim"), timeout=20)
    assert not any(_pid_alive(p) for p in pids)


def _pids_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _gone(core: client.CoreV1Api, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except client.ApiException as exc:
        return exc.status == 404
    return False


def test_a_pod_over_its_ephemeral_storage_limit_is_evicted(
    namespace: str, core: client.CoreV1Api
) -> None:
    # A real eviction with no node pressure: the kubelet's eviction manager evicts a
    # pod whose emptyDir use exceeds the containers' ephemeral-storage limit.
    body = pod_body("evictee", ["sh", "-c", "head -c 40000000 /dev/zero > /tmp/fill; sleep 300"],
                    resources={"limits": {"ephemeral-storage": "16Mi"}},
                    volumeMounts=[{"name": "tmp", "mountPath": "/tmp"}],
                    pod={"volumes": [{"name": "tmp", "emptyDir": {}}]})  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "evictee", timeout=90)
    assert (pod.status.phase, pod.status.reason) == ("Failed", "Evicted")
    assert "ephemeral local storage" in pod.status.message


def test_eviction_api_deletes_pod(namespace: str, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(namespace, pod_body("evicted", ["sleep", "300"]))
    wait_for(
        "running", lambda: core.read_namespaced_pod("evicted", namespace).status.phase == "Running"
    )
    core.create_namespaced_pod_eviction("evicted", namespace, {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "evicted", "namespace": namespace},
        "deleteOptions": {"gracePeriodSeconds": 1},
    })  # fmt: skip
    wait_for("the pod to be gone", lambda: _gone(core, namespace, "evicted"), timeout=20)


def test_deployment_pod_becomes_ready(
    namespace: str, api: client.ApiClient, core: client.CoreV1Api
) -> None:
    server = (
        "import os, http.server as h\n"
        "addr = ('0.0.0.0', int(os.environ['PORT']))\n"
        "h.ThreadingHTTPServer(addr, h.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    port = 8080  # the pod's own network namespace: any port, probed at the pod's IP
    body = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "main", "image": IMAGE, "command": ["python", "-c", server],
                    "workingDir": "/tmp",
                    "env": [{"name": "PORT", "value": str(port)}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": port}, "periodSeconds": 1},
                    "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
                }]},
            },
        },
    }  # fmt: skip
    client.AppsV1Api(api).create_namespaced_deployment(namespace, body)

    def ready_pod() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        return any(
            p.status.phase == "Running"
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            for p in pods
        )

    wait_for("a Ready pod", ready_pod, timeout=30)
    wait_for(
        "available replicas",
        lambda: (
            client.AppsV1Api(api)
            .read_namespaced_deployment("web", namespace)
            .status.available_replicas
            == 1
        ),
        timeout=20,
    )


# -- more kubelet behaviour ------------------------------------------------------------------


def running(core: client.CoreV1Api, ns: str, name: str) -> None:
    wait_for(
        f"{name} running", lambda: core.read_namespaced_pod(name, ns).status.phase == "Running"
    )


def test_kubectl_logs_follow_streams(kube: Any, namespace: str, core: client.CoreV1Api) -> None:
    script = "echo first; sleep 2; echo second"
    core.create_namespaced_pod(namespace, pod_body("chatty", ["sh", "-c", script]))
    running(core, namespace, "chatty")
    argv = [
        kube.kubectl_binary,
        "--kubeconfig",
        str(kube.kubeconfig),
        "logs",
        "-f",
        "-n",
        namespace,
        "chatty",
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as follow:
        assert follow.stdout is not None
        t0 = time.monotonic()
        assert follow.stdout.readline().strip() == "first"
        assert time.monotonic() - t0 < 1.5  # streamed, not delivered at exit
        assert follow.stdout.readline().strip() == "second"
        assert follow.wait(10) == 0
    out = kube.kubectl("logs", "-n", namespace, "chatty", "--tail=1")
    assert out.stdout.strip() == "second"


def test_on_failure_restarts_with_backoff_and_previous_logs(
    namespace: str, core: client.CoreV1Api
) -> None:
    body = pod_body(
        "crashy", ["sh", "-c", "echo attempt; exit 2"], pod={"restartPolicy": "OnFailure"}
    )
    core.create_namespaced_pod(namespace, body)

    def restarted() -> Any:
        statuses = core.read_namespaced_pod("crashy", namespace).status.container_statuses or []
        return statuses and statuses[0].restart_count >= 1 and statuses[0]

    status = wait_for("a restart", restarted, timeout=15)
    assert status.last_state.terminated.exit_code == 2
    previous = core.read_namespaced_pod_log("crashy", namespace, previous=True)
    assert "attempt" in previous


def test_init_containers_then_main_share_empty_dir(namespace: str, core: client.CoreV1Api) -> None:
    mount = [{"name": "work", "mountPath": "/work-area"}]
    body = pod_body("inits", ["cat", "/work-area/made-by-init"], volumeMounts=mount, pod={
        "initContainers": [{"name": "prep", "image": IMAGE, "volumeMounts": mount,
                            "command": ["sh", "-c", "echo prepared > /work-area/made-by-init"]}],
        "volumes": [{"name": "work", "emptyDir": {}}],
    })  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "inits")
    assert pod.status.phase == "Succeeded"
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert pod_log(core, namespace, "inits").strip() == "prepared"


def test_pvc_bound_to_host_path_pv(namespace: str, core: client.CoreV1Api, tmp_path: Path) -> None:
    store = tmp_path / "pv"
    store.mkdir()
    store.chmod(0o777)  # the image's user (not root) writes there
    pv_name = f"pv-{namespace}"
    core.create_persistent_volume({
        "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "manual", "hostPath": {"path": str(store)},
                 "claimRef": {"namespace": namespace, "name": "claim"}},
    })  # fmt: skip
    try:
        core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": "claim"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                     "resources": {"requests": {"storage": "1Gi"}}},
        })  # fmt: skip
        body = pod_body(
            "writer",
            ["sh", "-c", "echo kept > /out/result.txt"],
            volumeMounts=[{"name": "out", "mountPath": "/out"}],
            pod={"volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": "claim"}}]},
        )
        core.create_namespaced_pod(namespace, body)
        pod = finished_pod(core, namespace, "writer")
        assert pod.status.phase == "Succeeded"
        assert (store / "result.txt").read_text() == "kept\n"
    finally:
        core.delete_persistent_volume(pv_name)


def test_read_only_root_filesystem_and_run_as_user(namespace: str, core: client.CoreV1Api) -> None:
    script = (
        "id -u; touch /etc/nope 2>/dev/null && echo ROOT-RW || echo ROOT-RO; "
        "touch /scratch/ok && echo VOL-RW"
    )
    body = pod_body("locked", ["sh", "-c", script],
                    securityContext={"readOnlyRootFilesystem": True, "runAsUser": 1234,
                                     "runAsGroup": 1234},
                    volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
                    pod={"volumes": [{"name": "scratch", "emptyDir": {}}]})  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    finished_pod(core, namespace, "locked")
    text = pod_log(core, namespace, "locked")
    assert text.split() == ["1234", "ROOT-RO", "VOL-RW"], text


def test_pod_active_deadline_seconds(namespace: str, core: client.CoreV1Api) -> None:
    # A short grace: sleep as PID 1 ignores the SIGTERM (see the Job deadline test).
    body = pod_body("late", ["sleep", "300"],
                    pod={"activeDeadlineSeconds": 1, "terminationGracePeriodSeconds": 1})
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "late", timeout=40)
    assert (pod.status.phase, pod.status.reason) == ("Failed", "DeadlineExceeded")


def test_fallback_to_logs_on_error(namespace: str, core: client.CoreV1Api) -> None:
    body = pod_body("fallback", ["sh", "-c", "echo it broke; exit 1"],
                    terminationMessagePolicy="FallbackToLogsOnError")  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    pod = finished_pod(core, namespace, "fallback")
    assert pod.status.container_statuses[0].state.terminated.message.strip() == "it broke"


# -- faults and more nodes (these change the shared stack: keep them last) ------------------


def test_apiserver_restart_then_pods_still_run(
    kube: Any, namespace: str, core: client.CoreV1Api
) -> None:
    try:
        kube.restart_apiserver()
    except NotImplementedError as exc:
        needs_own_component(str(exc))
    core.create_namespaced_pod(namespace, pod_body("after", ["true"]))
    pod = finished_pod(core, namespace, "after", timeout=30)
    assert pod.status.phase == "Succeeded"


def test_second_node_with_selector_and_deletion_while_kubelet_down(
    kube: Any, namespace: str, core: client.CoreV1Api
) -> None:
    try:
        node = kube.nodes.get("node-2") or kube.add_node("node-2", labels={"pool": "big"})
    except NotImplementedError as exc:
        needs_own_component(str(exc))
    marker = uuid.uuid4().hex
    body = pod_body("picky", ["sh", "-c", f"sleep 300; : {marker}"],
                    pod={"nodeSelector": {"pool": "big"}})  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    running(core, namespace, "picky")
    assert core.read_namespaced_pod("picky", namespace).spec.node_name == "node-2"
    pids = wait_for("the sleep", lambda: _pids_with(marker))
    node.stop_kubelet()  # like a kubelet restart: the container keeps running
    try:
        core.delete_namespaced_pod("picky", namespace, grace_period_seconds=1)
        time.sleep(1)
        assert not _gone(core, namespace, "picky")  # nobody to finish the deletion
        assert all(_pid_alive(p) for p in pids)
    finally:
        node.start_kubelet()
    wait_for("the pod to be gone", lambda: _gone(core, namespace, "picky"), timeout=20)
    assert not any(_pid_alive(p) for p in pids)


def test_the_node_never_garbage_collects_its_images(kube: Any) -> None:
    # The images were imported (no registry can give them back): a kubelet on a disk
    # over 85% full deleted the pause image once, and no pod could start after that.
    configz = kube.kubectl("get", "--raw", "/api/v1/nodes/node-1/proxy/configz", check=True)
    config = json.loads(configz.stdout)["kubeletconfig"]
    assert config["imageGCHighThresholdPercent"] == 100, config

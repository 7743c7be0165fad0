"""The runner inside a real Job on the local Kubernetes stack (apiserver, Job
controller, node agent), talking to the real broker.

The pod looks like the dispatcher's: message from a ConfigMap at
/etc/autoreduce/message, broker password from a Secret, archive as a read-only
hostPath at /isis, output as a hostPath at /instrument, /tmp an emptyDir, read-only
root filesystem. No runner config file: the built-in (legacy ISIS) defaults apply.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from kubernetes import client

from tests.conftest import QueueReader

pytestmark = pytest.mark.integration

IMAGE = "autoreduce-runner:dev"
UNC_DATA = "\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\WISH00012345.nxs"
SCRIPT = """
import os, subprocess, sys
sys.path.append(os.path.dirname(os.path.realpath(__file__)))
import reduce_vars as web_var

def main(input_file, output_dir):
    print("reducing", input_file, "with", web_var.standard_vars["mask"], flush=True)
    os.write(2, b"from C level\\n")
    subprocess.run(["echo", "from a subprocess"], check=True)
    with open(os.path.join(output_dir, "reduced.txt"), "w") as f:
        f.write(web_var.standard_vars["mask"])
"""


@pytest.fixture
def core(kube: Any) -> Iterator[client.CoreV1Api]:
    with kube.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def batch(kube: Any) -> Iterator[client.BatchV1Api]:
    with kube.api_client() as api:
        yield client.BatchV1Api(api)


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _message(script: str) -> dict[str, Any]:
    return {
        "data": UNC_DATA, "facility": "ISIS", "instrument": "WISH", "rb_number": "1234567",
        "run_number": 12345, "run_version": 0, "reduction_script": script,
        "reduction_arguments": {"standard_vars": {"mask": "mask-from-web.xml"},
                                "advanced_vars": {}},
        "started_by": 0, "legacy_extra": "kept",
    }  # fmt: skip


def _env(settings: BrokerSettings) -> list[dict[str, str]]:
    env = [
        {"name": "AUTOREDUCE_MESSAGE_FILE", "value": "/etc/autoreduce/message/message.json"},
        {"name": "AUTOREDUCE_BROKER__HOSTS", "value": ",".join(settings.hosts)},
        {"name": "AUTOREDUCE_BROKER__USERNAME", "value": settings.username},
        {"name": "AUTOREDUCE_BROKER__PASSWORD_FILE", "value": "/etc/autoreduce/broker/password"},
        {"name": "AUTOREDUCE_TERMINATION_LOG", "value": "/dev/termination-log"},
    ]
    for name, queue in settings.queues.model_dump().items():
        env.append({"name": f"AUTOREDUCE_BROKER__QUEUES__{name.upper()}", "value": queue})
    return env


def _job(name: str, *, settings: BrokerSettings, archive: Path, output: Path) -> dict[str, Any]:
    volumes = [
        {"name": "message", "configMap": {"name": name}},
        {"name": "broker", "secret": {"secretName": name,
                                      "items": [{"key": "password", "path": "password"}]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "archive", "hostPath": {"path": str(archive), "type": "Directory"}},
        {"name": "output", "hostPath": {"path": str(output), "type": "Directory"}},
    ]  # fmt: skip
    mounts = [
        {"name": "message", "mountPath": "/etc/autoreduce/message", "readOnly": True},
        {"name": "broker", "mountPath": "/etc/autoreduce/broker", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "archive", "mountPath": "/isis", "readOnly": True},
        {"name": "output", "mountPath": "/instrument"},
    ]
    container = {
        "name": "runner", "image": IMAGE, "command": ["python", "-m", "autoreduce_runner"],
        "env": _env(settings), "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
    }  # fmt: skip
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "containers": [container], "volumes": volumes,
        }}},
    }  # fmt: skip


def _run_job(
    *, kube: Any, namespace: str, core: client.CoreV1Api, batch: client.BatchV1Api,
    settings: BrokerSettings, tmp_path: Path, script: str,
) -> tuple[str, Any, Path]:  # fmt: skip
    archive, output = tmp_path / "archive", tmp_path / "output"
    data_dir = archive / "NDXWISH/Instrument/data/cycle_23_4"
    data_dir.mkdir(parents=True)
    (data_dir / "WISH00012345.nxs").write_text("raw")
    output.mkdir()
    output.chmod(0o777)
    name = f"reduce-{uuid.uuid4().hex[:8]}"
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name),
        data={"message.json": json.dumps(_message(script))}))  # fmt: skip
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        string_data={"password": settings.password.get_secret_value()}))  # fmt: skip
    batch.create_namespaced_job(namespace, _job(name, settings=settings, archive=archive,
                                                output=output))  # fmt: skip

    def finished() -> Any:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        done = [p for p in pods if p.status.phase in ("Succeeded", "Failed")]
        return done[0] if done else None

    pod = wait_for(f"job {name} to finish", finished, timeout=120)
    return name, pod, output


def test_runner_job_posts_complete_and_kubectl_logs_show_the_script(
    kube: Any, namespace: str, core: client.CoreV1Api, batch: client.BatchV1Api,
    broker_settings: BrokerSettings, reader: QueueReader, tmp_path: Path,
) -> None:  # fmt: skip
    name, pod, output = _run_job(kube=kube, namespace=namespace, core=core, batch=batch,
                                 settings=broker_settings, tmp_path=tmp_path, script=SCRIPT)
    q = broker_settings.queues
    reader.wait_for(lambda seen: any(d.destination == q.complete for d in seen), timeout=30)
    logs = kube.kubectl("logs", "-n", namespace, f"job/{name}")
    assert logs.returncode == 0, logs.stderr
    term = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Succeeded", (term, logs.stdout[-3000:])
    assert term.exit_code == 0

    (body,) = reader.bodies(q.complete)
    assert len(reader.bodies(q.started)) == 1
    final = "/instrument/WISH/RBNumber/RB1234567/autoreduced/12345/run-version-0"
    assert body["reduction_data"] == [final]
    assert body["legacy_extra"] == "kept"
    host_final = output / final.removeprefix("/instrument/")
    assert (host_final / "reduced.txt").read_text() == "mask-from-web.xml"
    expected = [
        "reducing /isis/NDXWISH/Instrument/data/cycle_23_4/WISH00012345.nxs "
        "with mask-from-web.xml",
        "from C level",
        "from a subprocess",
    ]
    for line in expected:
        assert line in body["reduction_log"]
        assert line in logs.stdout, logs.stdout[-3000:]
    assert json.loads(term.message) == {
        "outcome": "Complete", "posted": True, "retry_in": None, "message": f"output in {final}"
    }


def test_runner_job_script_error_exit_1_with_termination_message(
    kube: Any, namespace: str, core: client.CoreV1Api, batch: client.BatchV1Api,
    broker_settings: BrokerSettings, reader: QueueReader, tmp_path: Path,
) -> None:  # fmt: skip
    script = "def main(input_file, output_dir):\n    raise ValueError('no vanadium run')\n"
    _, pod, output = _run_job(kube=kube, namespace=namespace, core=core, batch=batch,
                              settings=broker_settings, tmp_path=tmp_path, script=script)
    q = broker_settings.queues
    reader.wait_for(lambda seen: any(d.destination == q.error for d in seen), timeout=30)
    (body,) = reader.bodies(q.error)
    expected = "Error in user reduction script: ValueError - no vanadium run"
    assert body["message"] == expected
    term = pod.status.container_statuses[0].state.terminated
    assert pod.status.phase == "Failed" and term.exit_code == 1
    assert json.loads(term.message) == {
        "outcome": "Error", "posted": True, "retry_in": None, "message": expected
    }
    # The writability check made the parent; the final folder never appeared.
    assert not (output / "WISH/RBNumber/RB1234567/autoreduced/12345/run-version-0").exists()

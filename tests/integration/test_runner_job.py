"""The runner inside a real Job on the local Kubernetes stack (apiserver, Job
controller, a real kubelet running the runner image), talking to the real broker.

The pod looks like the dispatcher's: message from a ConfigMap at
/etc/autoreduce/message, broker password from a Secret, archive as a read-only
hostPath at /isis, output as a hostPath at /instrument, /tmp an emptyDir, read-only
root filesystem. No runner config file: the built-in (legacy ISIS) defaults apply,
except where a test sets a setting through the container's environment. A third
hostPath, /private, lies outside both the archive and the output roots: hostile
paths aim at it.

Every test checks that exactly one outcome reached the outcome queues, the exit
code and the Job's condition, and the termination message in the pod status.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from kubernetes import client

from devstack.images import RUNNER, product_version
from devstack.paths import repo_root
from devstack.product import EVERY_OUTPUT_LINES, EVERY_OUTPUT_SCRIPT
from devstack.queues import QueueReader
from tests.harness.checks import only_outcome

pytestmark = pytest.mark.integration

IMAGE = RUNNER.tag(product_version(repo_root()))  # the image the stack built
UNC_DATA = "\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\WISH00012345.nxs"
FINAL = "/instrument/WISH/RBNumber/RB1234567/autoreduced/12345/run-version-0"
SCRIPT_LOG = (
    "/instrument/WISH/RBNumber/RB1234567/autoreduced/reduction_log/"
    "RB1234567_Run12345_v0_Script.out"
)
# How runner-image/README.md tells an operator to read the runner's outcome.
TERMINATION_JSONPATH = (
    '{.items[*].status.containerStatuses[?(@.name=="runner")].state.terminated.message}'
)
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


@dataclass(frozen=True)
class Site:
    """The host side of the pod's hostPath volumes."""

    archive: Path  # /isis in the pod (read-only)
    output: Path  # /instrument in the pod
    private: Path  # /private in the pod: outside every root
    secret: Path  # a file in private/ that no run may read
    secret_text: str

    def host(self, pod_path: str) -> Path:
        """Where a path under /instrument in the pod is on the host."""
        return self.output / pod_path.removeprefix("/instrument/")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    archive, output, private = tmp_path / "archive", tmp_path / "output", tmp_path / "private"
    data_dir = archive / "NDXWISH/Instrument/data/cycle_23_4"
    data_dir.mkdir(parents=True)
    (data_dir / "WISH00012345.nxs").write_text("raw")
    for writable in (output, private):
        writable.mkdir()
        writable.chmod(0o777)
    secret_text = f"secret-{uuid.uuid4().hex}"
    secret = private / "secret.nxs"
    secret.write_text(secret_text)
    return Site(archive=archive, output=output, private=private, secret=secret,
                secret_text=secret_text)  # fmt: skip


@dataclass(frozen=True)
class JobRun:
    """A finished reduction Job and its one pod."""

    name: str
    pod: Any  # V1Pod, phase Succeeded or Failed
    condition: str  # the Job's final condition: Complete or Failed

    @property
    def terminated(self) -> Any:
        return self.pod.status.container_statuses[0].state.terminated

    @property
    def termination(self) -> dict[str, Any]:
        """The runner's termination message, as Kubernetes put it in the pod status."""
        decoded: dict[str, Any] = json.loads(self.terminated.message)
        return decoded


def _message(script: str, **fields: Any) -> dict[str, Any]:
    message = {
        "data": UNC_DATA, "facility": "ISIS", "instrument": "WISH", "rb_number": "1234567",
        "run_number": 12345, "run_version": 0, "reduction_script": script,
        "reduction_arguments": {"standard_vars": {"mask": "mask-from-web.xml"},
                                "advanced_vars": {}},
        "started_by": 0, "legacy_extra": "kept",
    }  # fmt: skip
    message.update(fields)
    return message


def _env(settings: BrokerSettings, extra: dict[str, str]) -> list[dict[str, str]]:
    env = [
        {"name": "AUTOREDUCE_MESSAGE_FILE", "value": "/etc/autoreduce/message/message.json"},
        {"name": "AUTOREDUCE_BROKER__HOSTS", "value": ",".join(settings.hosts)},
        {"name": "AUTOREDUCE_BROKER__USERNAME", "value": settings.username},
        {"name": "AUTOREDUCE_BROKER__PASSWORD_FILE", "value": "/etc/autoreduce/broker/password"},
        {"name": "AUTOREDUCE_TERMINATION_LOG", "value": "/dev/termination-log"},
    ]
    for name, queue in settings.queues.model_dump().items():
        env.append({"name": f"AUTOREDUCE_BROKER__QUEUES__{name.upper()}", "value": queue})
    if settings.tls.enabled:  # the broker's CA rides in the password's Secret here
        env.extend([{"name": "AUTOREDUCE_BROKER__TLS__ENABLED", "value": "true"},
                    {"name": "AUTOREDUCE_BROKER__TLS__CA_FILE",
                     "value": "/etc/autoreduce/broker/ca.crt"}])
    env.extend({"name": name, "value": value} for name, value in extra.items())
    return env


def _ca(settings: BrokerSettings) -> dict[str, str]:
    ca = settings.tls.ca_file
    return {"ca.crt": ca.read_text()} if settings.tls.enabled and ca is not None else {}


def _job(name: str, *, settings: BrokerSettings, site: Site,
         env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    volumes = [
        {"name": "message", "configMap": {"name": name}},
        {"name": "broker", "secret": {"secretName": name, "items": [
            {"key": key, "path": key} for key in ("password", "ca.crt")
            if key == "password" or settings.tls.enabled]}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "archive", "hostPath": {"path": str(site.archive), "type": "Directory"}},
        {"name": "output", "hostPath": {"path": str(site.output), "type": "Directory"}},
        {"name": "private", "hostPath": {"path": str(site.private), "type": "Directory"}},
    ]  # fmt: skip
    mounts = [
        {"name": "message", "mountPath": "/etc/autoreduce/message", "readOnly": True},
        {"name": "broker", "mountPath": "/etc/autoreduce/broker", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "archive", "mountPath": "/isis", "readOnly": True},
        {"name": "output", "mountPath": "/instrument"},
        {"name": "private", "mountPath": "/private"},
    ]
    container = {
        "name": "runner", "image": IMAGE, "command": ["python", "-m", "autoreduce_runner"],
        "env": _env(settings, env), "volumeMounts": mounts,
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


def _job_condition(batch: client.BatchV1Api, *, namespace: str, name: str) -> str | None:
    job = batch.read_namespaced_job(name, namespace)
    for condition in (job.status.conditions if job.status else None) or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return str(condition.type)
    return None


@pytest.fixture
def run_job(
    namespace: str, core: client.CoreV1Api, batch: client.BatchV1Api, broker: Any,
    broker_settings: BrokerSettings, site: Site,
) -> Callable[..., JobRun]:  # fmt: skip
    """Run one message in a Job, connecting as the runners' broker identity, and wait
    until the Job has its final condition."""
    runner_broker = broker.settings_for(broker.runner, broker_settings)

    def run(message: dict[str, Any], *, env: dict[str, str] | None = None) -> JobRun:
        name = f"reduce-{uuid.uuid4().hex[:8]}"
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=name),
            data={"message.json": json.dumps(message)}))  # fmt: skip
        core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            string_data={"password": runner_broker.password.get_secret_value(),
                         **_ca(runner_broker)}))  # fmt: skip
        batch.create_namespaced_job(namespace, _job(name, settings=runner_broker, site=site,
                                                    env=env or {}))  # fmt: skip

        def finished() -> Any:
            pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
            done = [p for p in pods if p.status.phase in ("Succeeded", "Failed")]
            return done[0] if done else None

        pod = wait_for(f"job {name} to finish", finished, timeout=120)
        condition = wait_for(f"job {name} to get its final condition",
                             lambda: _job_condition(batch, namespace=namespace, name=name))
        return JobRun(name=name, pod=pod, condition=condition)

    return run


def assert_error_exit(run: JobRun, body: dict[str, Any]) -> None:
    """A posted ReductionError without retry_in: exit 1 (ExitCode.POSTED_ERROR), Job Failed."""
    assert run.pod.status.phase == "Failed", run.terminated
    assert run.terminated.exit_code == 1
    assert run.condition == "Failed"
    assert body["retry_in"] is None
    assert run.termination == {
        "stage": "posted", "outcome": "Error", "posted": True, "retry_in": None, "reason": "",
        "message": body["message"], "reduction_data": [],
    }


def assert_no_output(site: Site) -> None:
    """Nothing in the final location: no folder, no staging folder next to it."""
    final = site.host(FINAL)
    assert not final.exists()
    if final.parent.exists():
        assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]


# -- complete, skipped, logs ----------------------------------------------------------


def test_runner_job_posts_complete_and_kubectl_logs_show_the_script(
    kube: Any, namespace: str, run_job: Callable[..., JobRun], site: Site,
    broker_settings: BrokerSettings, reader: QueueReader,
) -> None:  # fmt: skip
    run = run_job(_message(SCRIPT))
    q = broker_settings.queues
    body = only_outcome(reader, broker_settings, q.complete)
    logs = kube.kubectl("logs", "-n", namespace, f"job/{run.name}")
    assert logs.returncode == 0, logs.stderr
    assert run.pod.status.phase == "Succeeded", (run.terminated, logs.stdout[-3000:])
    assert run.terminated.exit_code == 0
    assert run.condition == "Complete"

    assert len(reader.bodies(q.started)) == 1
    assert body["reduction_data"] == [FINAL]
    assert body["legacy_extra"] == "kept"
    assert (site.host(FINAL) / "reduced.txt").read_text() == "mask-from-web.xml"
    expected = [
        "reducing /isis/NDXWISH/Instrument/data/cycle_23_4/WISH00012345.nxs "
        "with mask-from-web.xml",
        "from C level",
        "from a subprocess",
    ]
    for line in expected:
        assert line in body["reduction_log"]
        assert line in logs.stdout, logs.stdout[-3000:]
    assert run.termination == {
        "stage": "posted", "outcome": "Complete", "posted": True, "retry_in": None, "reason": "",
        "message": "", "reduction_data": [FINAL],
    }


def test_runner_job_skipped_run_exits_0_and_says_skipped_in_the_termination_message(
    kube: Any, namespace: str, run_job: Callable[..., JobRun], site: Site,
    broker_settings: BrokerSettings, reader: QueueReader,
) -> None:  # fmt: skip
    script = (
        "SKIP_RUNS = [999, '12345']\n"
        "def main(input_file, output_dir):\n    raise RuntimeError('must not run')\n"
    )
    run = run_job(_message(script, run_number="012345"))
    q = broker_settings.queues
    body = only_outcome(reader, broker_settings, q.skipped)
    assert body["message"] == "Run 12345 is in the reduction script's SKIP_RUNS: skipped"
    assert body["run_number"] == "012345" and body["legacy_extra"] == "kept"
    assert body["reduction_data"] == []
    assert len(reader.bodies(q.started)) == 1
    # A skip is a normal ending: exit 0 and a Complete Job, like a reduced run...
    assert run.pod.status.phase == "Succeeded", run.terminated
    assert run.terminated.exit_code == 0
    assert run.condition == "Complete"
    # ...told apart by the termination message, which the README's jsonpath reads.
    assert run.termination == {
        "stage": "posted", "outcome": "Skipped", "posted": True, "retry_in": None, "reason": "",
        "message": body["message"], "reduction_data": [],
    }
    shown = kube.kubectl("get", "pods", "-n", namespace, "-l", f"job-name={run.name}",
                         "-o", f"jsonpath={TERMINATION_JSONPATH}")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["outcome"] == "Skipped"
    assert_no_output(site)


def test_runner_job_pod_log_has_print_c_level_and_subprocess_output_in_order(
    kube: Any, namespace: str, run_job: Callable[..., JobRun], site: Site,
    broker_settings: BrokerSettings, reader: QueueReader,
) -> None:  # fmt: skip
    run = run_job(_message(EVERY_OUTPUT_SCRIPT))
    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    assert run.terminated.exit_code == 0 and run.condition == "Complete"
    # What `kubectl logs` shows: the container log, served by the node through the apiserver.
    logs = kube.kubectl("logs", "-n", namespace, f"job/{run.name}", "-c", "runner")
    assert logs.returncode == 0, logs.stderr
    lines = EVERY_OUTPUT_LINES
    script_log = site.host(SCRIPT_LOG).read_text()
    for where, text in (("pod log", logs.stdout), ("reduction_log", body["reduction_log"]),
                        ("script log file", script_log)):  # fmt: skip
        missing = [line for line in lines if line not in text]
        assert not missing, (where, missing, text[-3000:])
        positions = [text.index(line) for line in lines]
        assert positions == sorted(positions), (where, text[-3000:])


# -- timeout ---------------------------------------------------------------------------

TIMEOUT_S, KILL_GRACE_S, LATE_S = 2, 1, 4
TIMEOUT_SCRIPT = """
import signal, subprocess, sys, time
LATE = "import sys, time; time.sleep({late}); open(sys.argv[1], 'w').write('late')"

def main(input_file, output_dir):
    # Ignored here and in the child (inherited): only the SIGKILL after the grace stops them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", LATE, "/instrument/late-child", "{marker}"])
    print("sleeping since", time.time(), flush=True)
    time.sleep({late})
    open("/instrument/late-main", "w").write("late")
"""


def _processes_with(marker: str) -> list[int]:
    """Live processes on this host (any PID namespace) whose command line has ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def test_runner_job_timeout_kills_the_script_and_posts_the_error(
    run_job: Callable[..., JobRun], site: Site, broker_settings: BrokerSettings,
    reader: QueueReader,
) -> None:  # fmt: skip
    marker = f"late-marker-{uuid.uuid4().hex}"
    script = TIMEOUT_SCRIPT.format(late=LATE_S, marker=marker)
    env = {"AUTOREDUCE_TIMEOUT_S": str(TIMEOUT_S), "AUTOREDUCE_KILL_GRACE_S": str(KILL_GRACE_S)}
    run = run_job(_message(script), env=env)
    body = only_outcome(reader, broker_settings, broker_settings.queues.error)
    assert body["message"] == (
        f"Reduction timed out after {TIMEOUT_S} s; the script's processes were killed"
    )
    assert_error_exit(run, body)
    assert len(reader.bodies(broker_settings.queues.started)) == 1
    assert body["reduction_data"] == []
    # main() was running when the timeout hit; SIGTERM was ignored, so SIGKILL ended it.
    found = re.search(r"sleeping since ([0-9.]+)", body["reduction_log"])
    assert found, body["reduction_log"]
    assert re.search(r"script process ended: status -9 after [0-9.]+ s", body["admin_log"]), (
        body["admin_log"]
    )
    # Nothing of the script is left running, and it never finished its work: neither
    # main() nor its child wrote the files they would have written after LATE_S.
    assert _processes_with(marker) == []
    would_have_written = float(found.group(1)) + LATE_S + 1
    time.sleep(max(0.0, would_have_written - time.time()))
    assert not (site.output / "late-main").exists()
    assert not (site.output / "late-child").exists()
    assert_no_output(site)


# -- bad input: one ReductionError, exit 1, Job Failed, nothing published -------------

READS_INPUT = "def main(input_file, output_dir):\n    print(open(input_file).read())\n"
DROP = object()  # remove the field from the message
BAD_INPUT: dict[str, tuple[dict[str, Any], str, bool]] = {
    # case: (message fields, the error message starts with, ReductionStarted posted)
    "missing-fields": (
        {"data": DROP, "reduction_script": DROP},
        "Invalid reduction message: missing required field(s): data, reduction_script",
        False,
    ),
    "rb-number-dotdot": (
        {"rb_number": "../../private"},
        "Invalid reduction message: invalid message: rb_number: ",
        False,
    ),
    "syntax-error": (
        {"reduction_script": "def main(input_file, output_dir)\n    pass\n"},
        "Error in user reduction script: SyntaxError - ",
        True,
    ),
    "no-main": (
        {"reduction_script": "X = 1\n"},
        "Error in user reduction script: AttributeError - reduce.py has no function main",
        True,
    ),
    "wrong-signature": (
        {"reduction_script": "def main(data):\n    pass\n"},
        "Error in user reduction script: TypeError - main(data) cannot be called as "
        "main(input_file=..., output_dir=...)",
        True,
    ),
    "sys-exit": (
        {"reduction_script": "import sys\ndef main(input_file, output_dir):\n    sys.exit(3)\n"},
        "Error in user reduction script: SystemExit - the script called sys.exit(3) in main()",
        True,
    ),
    "returns-not-a-path": (
        {"reduction_script": "def main(input_file, output_dir):\n    return 42\n"},
        "Error in user reduction script: TypeError - main() returned int; expected a "
        "directory path (str) or a list of them",
        True,
    ),
    "data-dotdot": (
        {"data": "/isis/NDXWISH/../../private/secret.nxs"},
        "Refused: data path '/private/secret.nxs' is outside the allowed roots (/isis)",
        True,
    ),
    "data-symlink": (
        {"data": "\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\link.nxs"},
        "Refused: data path '/private/secret.nxs' is outside the allowed roots (/isis)",
        True,
    ),
    "returned-dir-outside-roots": (
        {"reduction_script": (
            "def main(input_file, output_dir):\n"
            "    open(output_dir + '/out.txt', 'w').write('x')\n"
            "    return ['/instrument/fine', '/private/elsewhere']\n"
        )},
        "Refused: output directory returned by main() '/private/elsewhere' is outside the "
        "allowed roots (/instrument); no output was written",
        True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_runner_job_bad_input_ends_in_one_reduction_error(
    case: str, run_job: Callable[..., JobRun], site: Site,
    broker_settings: BrokerSettings, reader: QueueReader,
) -> None:  # fmt: skip
    fields, expected, started = BAD_INPUT[case]
    # In the pod this points at /private/secret.nxs, outside the archive root.
    link = site.archive / "NDXWISH/Instrument/data/cycle_23_4/link.nxs"
    link.symlink_to("/private/secret.nxs")
    secret_read_at = site.secret.stat().st_atime_ns
    message = _message(READS_INPUT)
    for field, value in fields.items():
        if value is DROP:
            del message[field]
        else:
            message[field] = value

    run = run_job(message)
    q = broker_settings.queues
    body = only_outcome(reader, broker_settings, q.error)
    assert body["message"].startswith(expected), body["message"]
    assert_error_exit(run, body)
    assert len(reader.bodies(q.started)) == (1 if started else 0)
    assert body["legacy_extra"] == "kept"  # the message echoed back, however bad
    assert body["reduction_data"] == []
    assert_no_output(site)
    # Hostile paths: nothing outside the roots was read or written.
    assert site.secret_text not in body["reduction_log"]
    assert site.secret.stat().st_atime_ns == secret_read_at
    assert sorted(p.name for p in site.private.iterdir()) == ["secret.nxs"]
    assert not (site.output / "fine").exists()


# -- a script error (exit 1) ------------------------------------------------------------


def test_runner_job_script_error_exit_1_with_termination_message(
    run_job: Callable[..., JobRun], site: Site, broker_settings: BrokerSettings,
    reader: QueueReader,
) -> None:  # fmt: skip
    script = "def main(input_file, output_dir):\n    raise ValueError('no vanadium run')\n"
    run = run_job(_message(script))
    body = only_outcome(reader, broker_settings, broker_settings.queues.error)
    assert body["message"] == "Error in user reduction script: ValueError - no vanadium run"
    assert_error_exit(run, body)
    # The writability check made the parent; the final folder never appeared.
    assert_no_output(site)

"""The local stack cleans up after itself: ``python -m devstack up`` stopped by a
SIGTERM or by a terminal's Ctrl-C leaves none of its processes (broker, etcd,
apiserver, controller-manager, scheduler, containerd, kubelet, shims, containers),
mounts, network namespaces, cgroups or folders behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from devstack.images import RUNNER, product_version
from devstack.paths import repo_root
from devstack.product import PYTHONPATH
from devstack.stack import leftovers
from tests.harness.signals import as_a_background_job

pytestmark = pytest.mark.integration


def _start(workdir: Path) -> tuple[subprocess.Popen[str], str, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack", "up", "--workdir", str(workdir)],
        cwd=repo_root(), env={**os.environ, "PYTHONPATH": PYTHONPATH},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own terminal session: a Ctrl-C reaches only it
        preexec_fn=as_a_background_job,  # noqa: PLW1509
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 400
    stack_id = kubeconfig = None
    while time.monotonic() < deadline and kubeconfig is None:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.match(r"stack (\w+) ready in ", line):
            stack_id = match.group(1)
        if match := re.search(r"export KUBECONFIG=(\S+)", line):
            kubeconfig = Path(match.group(1))
    if stack_id is None or kubeconfig is None:
        proc.kill()
        pytest.fail("the stack did not come up:\n" + "".join(seen), pytrace=False)
    return proc, stack_id, kubeconfig


def _run_a_pod(kubeconfig: Path) -> None:
    """A running container, so the stop must also end containers and their shims."""
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        core = k8s.CoreV1Api(api)
        image = RUNNER.tag(product_version(repo_root()))
        core.create_namespaced_pod("default", {
            "metadata": {"name": "sleeper"},
            "spec": {"containers": [{"name": "main", "image": image,
                                     "command": ["sleep", "600"]}]},
        })  # fmt: skip
        deadline = time.monotonic() + 90
        while core.read_namespaced_pod("sleeper", "default").status.phase != "Running":
            assert time.monotonic() < deadline, "the pod did not start"
            time.sleep(0.5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_stopped_stack_leaves_nothing_behind(how: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="autoreduce-cleanup-")) / "stack"
    proc, stack_id, kubeconfig = _start(workdir)
    try:
        _run_a_pod(kubeconfig)
        running = leftovers(workdir, stack_id)
        for kind in ("process", "mount", "netns", "cgroup", "folder"):
            assert any(item.startswith(kind) for item in running), (kind, running)
        assert any("with processes" in item for item in running), running  # the container
        if how == "SIGTERM":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground group
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping the stack" in out, out
    assert leftovers(workdir, stack_id) == []
    workdir.parent.rmdir()

"""A real node (devstack.node): the product's images, built from the Dockerfiles,
run by a real kubelet on Debian's containerd against the suite's control plane.

The node shares the session's cluster with the stack's own node, so it stays out of
the other tests' way: it carries a taint, and its pods name a scheduler of their own
that only it runs (the stack's scheduler binds only pods naming the default one).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devstack.errors import StackStartError
from devstack.images import ImageBuilder, node_image_archive
from devstack.node import PAUSE_IMAGE, Node, Scheduler
from devstack.paths import bin_dir
from devstack.pki import ClusterAccess
from tests.conftest import needs_own_component

pytestmark = pytest.mark.integration

SCHEDULER = "devstack-real-node"
TAINT_KEY = "autoreduce.dev/real-node"
RUNNER_UID = 10001


class RealNodes:
    """The session's real nodes and what it took to make them."""

    def __init__(self, *, workdir: Path, access: ClusterAccess, archive: Path,
                 images: dict[str, str], image_ids: dict[str, str | None],
                 timings: dict[str, float]) -> None:  # fmt: skip
        self.workdir, self.access, self.archive = workdir, access, archive
        self.images, self.image_ids, self.timings = images, image_ids, timings
        self.nodes: dict[str, Node] = {}

    def add(self, name: str, index: int) -> Node:
        node = Node(name=name, index=index, workdir=self.workdir / name, access=self.access,
                    stack_id=uuid.uuid4().hex[:6], image_archives=[self.archive],
                    taints=[f"{TAINT_KEY}=true:NoSchedule"])  # fmt: skip
        self.nodes[name] = node
        node.start()
        return node


def start_or_fail(component: str, start: Callable[[], Any]) -> Any:
    """A component that cannot start fails the run, naming it with its log's tail."""
    try:
        return start()
    except (StackStartError, RuntimeError) as exc:
        pytest.fail(f"{component} could not start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def real_nodes(kube: Any, session_dir: Path) -> Iterator[RealNodes]:
    if kube.pki is None:
        needs_own_component("a real node needs the suite's own control plane and its CA key")
    workdir = session_dir / "realnode"
    access = ClusterAccess(server=kube.server, ca_cert=kube.pki.ca.cert, ca_key=kube.pki.ca.key)
    builder = ImageBuilder()
    started = time.monotonic()
    try:
        images = start_or_fail("image builds (dockerd)", lambda: node_image_archive(
            builder, archive=workdir / "images.tar", pause_binary=bin_dir() / "pause",
            pause_tag=PAUSE_IMAGE))  # fmt: skip
        image_ids = builder.image_ids
    finally:
        builder.engine.stop()
    timings = {**builder.timings, "images in all": time.monotonic() - started}
    scheduler = Scheduler(workdir=workdir / "scheduler", access=access, scheduler_name=SCHEDULER)
    start_or_fail("kube-scheduler", scheduler.start)
    nodes = RealNodes(workdir=workdir, access=access, archive=workdir / "images.tar",
                      images=images, image_ids=image_ids, timings=timings)  # fmt: skip
    try:
        start_or_fail("real node real-1", lambda: nodes.add("real-1", 1))
        print(f"\nreal node timings: {timings} {nodes.nodes['real-1'].timings}")
        yield nodes
    finally:
        for node in nodes.nodes.values():
            node.stop()
        scheduler.stop()


@pytest.fixture
def core(kube: Any) -> Iterator[client.CoreV1Api]:
    with kube.api_client() as api:
        yield client.CoreV1Api(api)


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def runner_pod(name: str, *, node: str, image: str, command: list[str],
               memory: str = "256Mi") -> dict[str, Any]:  # fmt: skip
    """A pod with the reduction Job's security context (dispatcher/templates)."""
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "schedulerName": SCHEDULER, "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUNNER_UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "runner", "image": image, "imagePullPolicy": "Never",
                "command": command,
                "resources": {"limits": {"memory": memory, "cpu": "500m"}},
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "privileged": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
        },
    }  # fmt: skip


def terminated(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    pod = core.read_namespaced_pod(name, namespace)
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.state and status.state.terminated:
            return pod
    return None


def test_the_node_runs_containerd_and_goes_ready(kube: Any, real_nodes: RealNodes,
                                                 core: client.CoreV1Api) -> None:  # fmt: skip
    node = core.read_node("real-1")
    info = node.status.node_info
    assert info.container_runtime_version.startswith("containerd://")
    assert info.kubelet_version == "v1.37.2"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    # The node lifecycle controller lifted the taint every kubelet registers with.
    assert not [t for t in node.spec.taints or [] if t.key == "node.kubernetes.io/not-ready"]


SELF_CHECK = """
import json, os, pathlib, sys
def writable(path):
    try:
        pathlib.Path(path, "probe").write_text("x")
        return True
    except OSError:
        return False
print(json.dumps({
    "uid": os.getuid(), "root_writable": writable("/"), "tmp_writable": writable("/tmp"),
    "token": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
    "caps": [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0],
    "seccomp": [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0],
    "runner": __import__("autoreduce_runner").__name__,
}))
"""


def test_a_runner_image_pod_runs_with_the_jobs_security_context_and_serves_logs(
    kube: Any, real_nodes: RealNodes, core: client.CoreV1Api, namespace: str
) -> None:
    image = real_nodes.images["autoreduce-runner"]
    core.create_namespaced_pod(namespace, runner_pod(
        "selfcheck", node="real-1", image=image, command=["python", "-c", SELF_CHECK]))  # fmt: skip
    pod = wait_for("the pod to finish", lambda: terminated(core, namespace, "selfcheck"))
    status = pod.status.container_statuses[0]
    assert status.state.terminated.exit_code == 0, status.state.terminated
    assert status.container_id.startswith("containerd://")
    # No registry, so no repo digest: the ID is the image config's digest, as docker has it.
    assert status.image_id == real_nodes.image_ids[image]
    assert status.image in (image, f"docker.io/library/{image}")
    logs = kube.kubectl("logs", "-n", namespace, "selfcheck", check=True).stdout
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen == {"uid": RUNNER_UID, "root_writable": False, "tmp_writable": True,
                    "token": False, "caps": "0000000000000000", "seccomp": "2",
                    "runner": "autoreduce_runner"}  # fmt: skip


UNCOMPILED = """
import importlib, json, os, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(
    m.__name__ for m in list(sys.modules.values())
    if (getattr(m, "__file__", None) or "").startswith("/opt/autoreduce/")
    and m.__file__.endswith(".py") and not os.path.exists(m.__cached__ or "")
)))
"""


@pytest.mark.parametrize(("image", "entry"), [
    ("autoreduce-runner", ["autoreduce_runner.__main__", "autoreduce_runner.sidecar"]),
    ("autoreduce-dispatcher", ["dispatcher.app", "autoreduce_cli.cli"]),
], ids=["runner", "dispatcher"])  # fmt: skip
def test_the_images_carry_their_bytecode(
    kube: Any, real_nodes: RealNodes, core: client.CoreV1Api, namespace: str,
    image: str, entry: list[str],
) -> None:
    """The pods' root filesystem is read-only: a module without its .pyc in the image
    is compiled again at every start (about 2 s of CPU for a runner and its sidecar)."""
    name = f"bytecode-{image.removeprefix('autoreduce-')}"
    core.create_namespaced_pod(namespace, runner_pod(
        name, node="real-1", image=real_nodes.images[image],
        command=["python", "-c", UNCOMPILED, *entry]))  # fmt: skip
    pod = wait_for("the pod to finish", lambda: terminated(core, namespace, name))
    status = pod.status.container_statuses[0]
    logs = kube.kubectl("logs", "-n", namespace, name, check=True).stdout
    assert status.state.terminated.exit_code == 0, logs
    assert json.loads(logs.strip().splitlines()[-1]) == []


def test_a_container_over_its_memory_limit_is_oomkilled(
    real_nodes: RealNodes, core: client.CoreV1Api, namespace: str
) -> None:
    image = real_nodes.images["autoreduce-runner"]
    hog = "b = bytearray(256 * 1024 * 1024); print('survived')"
    body = runner_pod("hog", node="real-1", image=image, command=["python", "-c", hog],
                      memory="48Mi")  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    pod = wait_for("the pod to be killed", lambda: terminated(core, namespace, "hog"))
    state = pod.status.container_statuses[0].state.terminated
    assert (state.reason, state.exit_code) == ("OOMKilled", 137), state


# A runner stand-in: a child over the memory limit, then the runner's own OOM verdict.
CHILD_OOM = """
import json, pathlib, subprocess, sys
from autoreduce_runner.oom import oom_verdict, read_sample
root = pathlib.Path("/sys/fs/cgroup")
before = read_sample(root=root)
child = subprocess.run([sys.executable, "-c", "b = b'x' * (512 << 20)"], check=False)
after = read_sample(root=root)
print(json.dumps({"returncode": child.returncode, "oom_kills": [before.oom_kills,
    after.oom_kills], "verdict": oom_verdict(returncode=child.returncode, before=before,
    after=after)}))
"""


def test_the_runner_tells_an_oom_killed_child_from_its_cgroup(
    kube: Any, real_nodes: RealNodes, core: client.CoreV1Api, namespace: str
) -> None:
    """cgroup v1 kills only the largest process: the child dies, the runner lives on and
    reads the OOM kill from its container's memory cgroup (autoreduce_runner/oom.py)."""
    image = real_nodes.images["autoreduce-runner"]
    body = runner_pod("child-oom", node="real-1", image=image,
                      command=["python", "-c", CHILD_OOM], memory="128Mi")  # fmt: skip
    core.create_namespaced_pod(namespace, body)
    pod = wait_for("the pod to finish", lambda: terminated(core, namespace, "child-oom"))
    state = pod.status.container_statuses[0].state.terminated
    logs = kube.kubectl("logs", "-n", namespace, "child-oom", check=True).stdout
    assert state.exit_code == 0, (state, logs)
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["returncode"] == -9, seen
    assert seen["oom_kills"][1] > seen["oom_kills"][0], seen
    assert seen["verdict"] == "Reduction ran out of memory (limit 128Mi) and was killed"


def test_a_second_node_joins_and_a_killed_one_leaves_nothing_behind(
    real_nodes: RealNodes, core: client.CoreV1Api
) -> None:
    second = start_or_fail("real node real-2", lambda: real_nodes.add("real-2", 2))
    assert second.ready() and real_nodes.nodes["real-1"].ready()
    second.kill()
    assert second.leftovers() == []
    assert real_nodes.nodes["real-1"].ready()
    for ns in os.listdir("/run/netns"):
        assert ns != second.netns.name

"""Faults done to a pod on the stack's real nodes, the way they happen on a cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

# What the test dispatchers give every runner container (devstack.product): evict()
# writes past it, and the kubelet's eviction manager evicts the pod for real.
EPHEMERAL_LIMIT_MB = 64


def _container_id(kube: Any, pod: Any, container: str = "runner") -> tuple[Any, str]:
    with kube.api_client() as api:
        fresh = k8s.CoreV1Api(api).read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
    for status in fresh.status.container_statuses or []:
        if status.name == container and status.container_id:
            return kube.nodes[fresh.spec.node_name], str(status.container_id)
    raise AssertionError(f"pod {pod.metadata.name} has no running {container} container")


def kill_container(kube: Any, pod: Any) -> None:
    """SIGKILL every process of the runner container at once (a crash, a kernel kill)."""
    node, container_id = _container_id(kube, pod)
    node.kill_container(container_id)


def evict(kube: Any, pod: Any) -> None:
    """A real eviction: fill the pod's /tmp emptyDir past the container's
    ephemeral-storage limit; the kubelet evicts it (reason Evicted) within seconds."""
    node, _ = _container_id(kube, pod)
    fill = node.pod_volume_dir(pod.metadata.uid, "tmp") / "evict-me"
    with fill.open("wb") as out:
        for _ in range(EPHEMERAL_LIMIT_MB + 16):
            out.write(b"\0" * (1 << 20))


def _runner_pod(core: k8s.CoreV1Api, namespace: str, instrument: str) -> Any:
    pods = core.list_namespaced_pod(
        namespace, label_selector=f"autoreduce.io/instrument={instrument}").items
    for pod in pods:
        for status in pod.status.container_statuses or []:
            if status.state and status.state.running:
                return pod
    return None


def kill_runner_when_running(kube: Any, namespace: str, *, instrument: str,
                             log_line: str = "", timeout: float = 120.0) -> None:
    """Once the instrument's runner container runs (and has logged ``log_line``),
    SIGKILL it from outside: the runner dies at once, without a word. (A script cannot
    do this from inside: there the runner is PID 1, which ignores its SIGKILL.)"""
    deadline = time.monotonic() + timeout
    with kube.api_client() as api:
        core = k8s.CoreV1Api(api)
        while time.monotonic() < deadline:
            pod = _runner_pod(core, namespace, instrument)
            if pod is not None and (not log_line or log_line in core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container="runner")):
                kill_container(kube, pod)
                return
            time.sleep(0.2)
    raise AssertionError(f"no running {instrument} runner pod (with {log_line!r}) in {timeout}s")


def in_background(action: Callable[[], None]) -> Callable[[], None]:
    """Runs ``action`` on a thread; the returned join re-raises what it raised."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # handed to the joiner
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if failures:
            raise failures[0]

    return join

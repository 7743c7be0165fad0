"""The node: registration, heartbeats, the pod watch, binding, and the pod workers."""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.harness.nodeagent import logserver, runtime
from tests.harness.nodeagent.containers import Container, NodeContext
from tests.harness.nodeagent.kubeapi import Api, ApiError, pod_path
from tests.harness.nodeagent.podspec import condition, fits_node, wants_binding
from tests.harness.nodeagent.worker import PodWorker

Obj = dict[str, Any]
log = logging.getLogger("nodeagent")

HEARTBEAT_S = 10.0
CAPACITY = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


@dataclass
class AgentConfig:
    kubeconfig: str
    node_name: str
    port: int
    workdir: Path
    image_map: Path
    cert: Path
    key: Path
    apiserver_host: str
    apiserver_port: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[Obj] = field(default_factory=list)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.api = Api(cfg.kubeconfig)
        self.ctx = NodeContext(
            api=self.api, node_name=cfg.node_name, host_ip="127.0.0.1",
            pods_dir=cfg.workdir / "pods", image_map=cfg.image_map,
            apiserver_host=cfg.apiserver_host, apiserver_port=cfg.apiserver_port,
            capacity=CAPACITY, backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s,
        )  # fmt: skip
        self.labels = {
            "kubernetes.io/hostname": cfg.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **cfg.labels,
        }
        self.workers: dict[str, PodWorker] = {}
        self.by_name: dict[tuple[str, str], PodWorker] = {}
        self.done: set[str] = set()  # uids whose worker finished: never restart them
        # Pods whose binding failed on a server error (e.g. etcd away): the scheduler
        # retries those, and no further watch event may ever come for them.
        self.unbound: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> None:
        self.ctx.pods_dir.mkdir(parents=True, exist_ok=True)
        self._register()
        logserver.serve(
            port=self.cfg.port, cert=self.cfg.cert, key=self.cfg.key, lookup=self.lookup
        )
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self._memory_loop, daemon=True, name="memory").start()
        threading.Thread(target=self._rebind_loop, daemon=True, name="rebind").start()
        self._watch_loop()

    def shutdown(self, *, kill_pods: bool) -> None:
        self.stop.set()
        if not kill_pods:
            return
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            with w.lock:
                for c in w.containers():
                    c.kill(grace=0)

    # -- node ------------------------------------------------------------------------

    def _node_status(self) -> Obj:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conds = [
            condition("Ready", True, reason="KubeletReady", message="node agent is ready"),
            condition("MemoryPressure", False, reason="KubeletHasSufficientMemory"),
            condition("DiskPressure", False, reason="KubeletHasNoDiskPressure"),
            condition("PIDPressure", False, reason="KubeletHasSufficientPID"),
        ]  # fmt: skip
        for c in conds:
            c.pop("lastProbeTime")
            c["lastHeartbeatTime"] = now
        return {
            "conditions": conds,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.cfg.node_name},
            ],
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.cfg.port}},
            "nodeInfo": {
                "machineID": "autoreduce-test", "systemUUID": self.cfg.node_name,
                "bootID": str(os.getpid()), "kernelVersion": platform.release(),
                "osImage": "autoreduce node agent", "containerRuntimeVersion": "local://0.1",
                "kubeletVersion": "v1.37.2", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }  # fmt: skip

    def _register(self) -> None:
        name = self.cfg.node_name
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": self.labels},
        }
        while True:
            try:
                try:
                    self.api.post("/api/v1/nodes", body)
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                # Drop the not-ready taint admission adds at creation: this node is ready now
                # (no node-lifecycle controller runs to lift it).
                self.api.patch(
                    f"/api/v1/nodes/{name}",
                    {
                        "metadata": {"labels": self.labels},
                        "spec": {"taints": self.cfg.taints or None},
                    },
                    kind="merge-patch",
                )
                self.api.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status()})
                self._renew_lease()
                return
            except ApiError as exc:
                log.warning("node registration failed, retrying: %s", exc)
                time.sleep(1)

    def _renew_lease(self) -> None:
        name = self.cfg.node_name
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}
        try:
            lease = self.api.get(path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.api.get(f"/api/v1/nodes/{name}")
            owner = {
                "apiVersion": "v1",
                "kind": "Node",
                "name": name,
                "uid": node["metadata"]["uid"],
            }
            self.api.post(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {"metadata": {"name": name, "ownerReferences": [owner]}, "spec": spec},
            )
            return
        lease["spec"] = {**lease.get("spec", {}), **spec}
        self.api.put(path, lease)

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self._renew_lease()
                self.api.patch(f"/api/v1/nodes/{self.cfg.node_name}/status",
                               {"status": self._node_status()})  # fmt: skip
            except ApiError as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- pods ------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """List, then watch from the list's resourceVersion; re-list on 410 or breakage."""
        rv = ""
        while not self.stop.is_set():
            try:
                if not rv:
                    rv = self._list_pods()
                for event in self.api.watch("/api/v1/pods", resource_version=rv):
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] != "BOOKMARK":
                        self._on_pod(event["type"], obj)
            except ApiError as exc:
                if exc.status == 410:
                    rv = ""
                    continue
                log.warning("pod watch broke (%s); resuming", exc)
                time.sleep(0.5)

    def _list_pods(self) -> str:
        listing = self.api.get("/api/v1/pods")
        seen = set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self._on_pod("ADDED", pod)
        with self.lock:
            vanished = [w for uid, w in self.workers.items() if uid not in seen]
        for w in vanished:  # deleted while our watch was down
            w.deleted()
        return str(listing["metadata"]["resourceVersion"])

    def _on_pod(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if spec.get("nodeName") == self.cfg.node_name:
            self._dispatch(kind, pod)
        elif kind != "DELETED" and wants_binding(pod):
            if fits_node(pod, labels=self.labels, taints=self.cfg.taints):
                self._bind(pod)
        elif uid in self.workers and kind == "DELETED":
            self.workers[uid].deleted()

    def _dispatch(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is None and kind != "DELETED" and uid not in self.done:
                log.info("starting pod %s/%s (%s)", pod["metadata"]["namespace"],
                         pod["metadata"]["name"], uid)  # fmt: skip
                worker = PodWorker(self.ctx, pod)
                self.workers[uid] = worker
                self.by_name[(pod["metadata"]["namespace"], pod["metadata"]["name"])] = worker
                worker.start()
                threading.Thread(target=self._reap_worker, args=(worker,), daemon=True).start()
                return
        if worker is None:
            return
        if kind == "DELETED":
            worker.deleted()
        else:
            worker.update(pod)

    def _reap_worker(self, worker: PodWorker) -> None:
        worker.thread.join()
        with self.lock:
            self.workers.pop(worker.uid, None)
            self.done.add(worker.uid)
            meta = worker.pod["metadata"]
            key = (meta["namespace"], meta["name"])
            if self.by_name.get(key) is worker:
                del self.by_name[key]

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.cfg.node_name},
        }  # fmt: skip
        try:
            self.api.post(pod_path(meta["namespace"], meta["name"], "binding"), body)
            log.info("bound %s/%s", meta["namespace"], meta["name"])
            with self.lock:
                self.unbound.pop(meta["uid"], None)
        except ApiError as exc:
            if exc.status in (404, 409):  # 409: bound already (another node, or a retry)
                with self.lock:
                    self.unbound.pop(meta["uid"], None)
                return
            log.warning("binding %s/%s failed (retrying): %s", meta["namespace"], meta["name"],
                        exc)
            with self.lock:
                self.unbound[meta["uid"]] = (meta["namespace"], meta["name"])

    def _rebind_loop(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                pending = list(self.unbound.items())
            for uid, (namespace, name) in pending:
                try:
                    pod = self.api.get(pod_path(namespace, name))
                except ApiError as exc:
                    if exc.status == 404:
                        with self.lock:
                            self.unbound.pop(uid, None)
                    continue
                if pod["metadata"]["uid"] != uid or not wants_binding(pod):
                    with self.lock:
                        self.unbound.pop(uid, None)
                    continue
                self._bind(pod)

    def lookup(self, namespace: str, pod: str, container: str) -> Container | str:
        with self.lock:
            worker = self.by_name.get((namespace, pod))
        if worker is None:
            return f'pod "{pod}" not found on node {self.cfg.node_name}'
        found = worker.find(container)
        return found if found is not None else f'container "{container}" not found in pod "{pod}"'

    # -- memory ----------------------------------------------------------------------

    def _memory_loop(self) -> None:
        """OOM stand-in: the whole process tree's RSS against the container's limit."""
        while not self.stop.wait(0.2):
            with self.lock:
                workers = list(self.workers.values())
            limited = [
                w for w in workers if any(c.memory_limit() and c.running for c in w.containers())
            ]
            if not limited:
                continue
            rss = runtime.process_tree_rss()
            for w in limited:
                w.memory_check(rss)

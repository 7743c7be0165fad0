"""Real nodes for the local control plane: Debian's containerd + runc + CNI plugins and
a kubelet v1.37.2 (hack/controlplane), plus a kube-scheduler to bind pods to them.

Each ``Node`` has a network namespace of its own (``nsenter --net``): containerd, the
CNI bridge its pods hang off and the kubelet live there, so nothing on the host's
network changes. The control plane listens on the host's loopback; relays
(devstack.netns) carry it across:

- inside the namespace, ``127.0.0.1:<apiserver port>`` (the kubelet's kubeconfig) and
  ``<service IP>:443`` (pods' in-cluster config, as a kube-proxy would) reach the
  apiserver;
- on the host, ``<host IP>:<kubelet port>`` reaches the kubelet, because the node's
  address *is* the host's: the kubelet refuses a loopback node IP, the apiserver dials
  a Node's InternalIP from the host, and no other address reaches the namespace
  without a route on the host. Nodes differ by kubelet port, not by address.

``stop()`` (graceful) and ``kill()`` (a power cut) both end by removing everything the
node made: its processes and containers, mounts, cgroups and namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devstack.errors import StackStartError, failed, log_tail
from devstack.mounts import mounts_under, unmount_all
from devstack.netns import NetNamespace, Relay, socket_in
from devstack.paths import bin_dir
from devstack.pki import ClusterAccess, issue_client_cert, write_kubeconfig
from devstack.process import Process, run

NOT_READY_TAINT = "node.kubernetes.io/not-ready"
PAUSE_IMAGE = "autoreduce.local/pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The kubelet sets these host-wide (not per namespace) unless told not to, and refuses
# to start when told not to and they differ; the stack puts the host's values back
# when its last kubelet stops. Recorded in /run so a reboot (which resets them) forgets.
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")  # fmt: skip
TUNABLES_RECORD = Path("/run/autoreduce/kernel-tunables.json")
SOCKET_PATH_MAX = 107


def host_address() -> str:
    """The host's own address on its default route: what the apiserver dials."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # a route lookup: a UDP connect sends nothing
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        raise StackStartError("a node needs a non-loopback IPv4 address on this host (the "
                              "apiserver dials the Node's InternalIP); found none")
    return address


def free_port(netns: Path | None = None, address: str = "127.0.0.1") -> int:
    with contextlib.closing(socket_in(netns)) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _http_ok(netns: Path | None, port: int, path: str) -> bool:
    """A plain-HTTP GET to 127.0.0.1 inside ``netns`` (the kubelet's healthz)."""
    try:
        with contextlib.closing(socket_in(netns)) as sock:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            return sock.recv(64).startswith(b"HTTP/1.0 200") or False
    except OSError:
        return False


# -- cgroups, mounts, kernel tunables ------------------------------------------------


def v1_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (on a hybrid host also the cgroup2 one)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2") and mountpoint.startswith(str(CGROUP_ROOT)):
            found.append(Path(mountpoint))
    return found


def make_cgroup_root(name: str) -> None:
    """The kubelet checks its cgroupRoot exists in every hierarchy before it creates
    kubepods below it; cpuset needs cpus/mems copied down or nothing can join it."""
    for hierarchy in v1_hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((hierarchy / knob).read_text())


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in v1_hierarchies():
        root = hierarchy / name
        if root.is_dir():
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs.read_text().split())
    return pids


def kill_cgroup(name: str, *, timeout: float = 15.0) -> None:
    """SIGKILL every process under the cgroup root until none is left."""
    deadline = time.monotonic() + timeout
    while pids := cgroup_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {sorted(pids)} in cgroup {name} survive SIGKILL")
        time.sleep(0.1)


def remove_cgroup(name: str) -> None:
    for hierarchy in v1_hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        for path in sorted((p for p in root.rglob("*") if p.is_dir()),
                           key=lambda p: len(p.parts), reverse=True):  # fmt: skip
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def _kubelets_running() -> bool:
    kubelet = str(bin_dir() / "kubelet")
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode() == kubelet:
                return True
    return False


def record_kernel_tunables() -> None:
    if TUNABLES_RECORD.exists() or _kubelets_running():
        return  # already recorded by the first of the running kubelets' stacks
    values = {k: (Path("/proc/sys") / k).read_text().strip() for k in KERNEL_TUNABLES}
    TUNABLES_RECORD.parent.mkdir(parents=True, exist_ok=True)
    TUNABLES_RECORD.write_text(json.dumps(values))


def restore_kernel_tunables() -> None:
    if not TUNABLES_RECORD.exists() or _kubelets_running():
        return
    for key, value in json.loads(TUNABLES_RECORD.read_text()).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)
    TUNABLES_RECORD.unlink()


def processes_matching(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every other process whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if text.encode() in cmdline:
                text_line = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append((int(proc.name), text_line))
    return found


def processes_with_arg(arg: str) -> list[int]:
    """Pids whose command line contains ``arg`` (shims name their containerd socket)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if arg.encode() in (proc / "cmdline").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


# -- a node --------------------------------------------------------------------------


@dataclass
class Node:
    """One real node. ``index`` (0-254) keeps its pod range and names apart from the
    stack's other nodes; ``stack_id`` keeps them apart from other stacks on the host."""

    name: str
    index: int
    workdir: Path
    access: ClusterAccess
    stack_id: str
    image_archives: list[Path] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)  # key=value:Effect
    service_ip: str | None = "10.0.0.1"
    # Ports of host services (the broker) that pods reach at <address>:<port>.
    host_ports: list[int] = field(default_factory=list)
    address: str = field(default_factory=host_address)
    kubelet_port: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    containerd: Process | None = None
    kubelet: Process | None = None
    relays: list[Relay] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.netns = NetNamespace(f"ar-{self.stack_id}-{self.index}")
        self.cgroup = f"autoreduce-{self.stack_id}-{self.index}"
        self.pod_cidr = f"10.88.{self.index}.0/24"
        if len(str(self.containerd_socket)) > SOCKET_PATH_MAX - 10:
            raise StackStartError(f"node {self.name}: workdir {self.workdir} is too long "
                                  "for a unix socket path; use a shorter one")  # fmt: skip

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    # -- start -------------------------------------------------------------------

    def start(self, *, timeout: float = 90.0) -> None:
        """Everything, in order; on any failure everything made so far is removed."""
        started = time.monotonic()
        try:
            self._start_network()
            self._start_containerd()
            self._import_images()
            self._start_kubelet()
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop(graceful=False)
            raise
        self.timings["node start"] = time.monotonic() - started

    def _start_network(self) -> None:
        self.netns.create()
        self.netns.add_uplink(address=self.address, gateway="169.254.0.1")
        port = self.access.port
        self.relays = [Relay(("127.0.0.1", port), ("127.0.0.1", port),
                             listen_ns=self.netns.path)]  # fmt: skip
        if self.service_ip:
            self.netns.add_local_address(self.service_ip)
            self.relays.append(Relay((self.service_ip, 443), ("127.0.0.1", port),
                                     listen_ns=self.netns.path))  # fmt: skip
        self.kubelet_port = self.kubelet_port or free_port(None, self.address)
        self.relays.append(Relay((self.address, self.kubelet_port),
                                 (self.address, self.kubelet_port),
                                 target_ns=self.netns.path))  # fmt: skip
        for relay in self.relays:
            relay.start()
        for host_port in self.host_ports:
            self._relay_host_port(host_port)

    def _relay_host_port(self, port: int) -> None:
        # Pods route everything to the bridge, i.e. into this namespace, where the
        # host's address is local: a relay there carries <address>:port to the host's.
        relay = Relay((self.address, port), (self.address, port), listen_ns=self.netns.path)
        relay.start()
        self.relays.append(relay)

    def expose_host_port(self, port: int) -> None:
        """From now on pods on this node reach the host's ``<address>:port``."""
        if port not in self.host_ports:
            self.host_ports.append(port)
            self._relay_host_port(port)

    def _containerd_config(self) -> Path:
        root = self.workdir / "containerd"
        cni = {
            "cniVersion": "1.0.0", "name": self.netns.name,
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": self.pod_cidr}]],
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": str(self.workdir / "cni" / "ipam")},
            }],
        }  # fmt: skip
        conf_dir = self.workdir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-autoreduce.conflist").write_text(json.dumps(cni, indent=2))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{root / 'ttrpc.sock'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state dir, not the host's /var/run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{conf_dir}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root / 'opt'}"
"""
        path = root / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config)
        return path

    def ctr(self, *args: str, what: str, input_bytes: bytes | None = None) -> str:
        argv = ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args]
        return run(argv, what=what, input_bytes=input_bytes)

    def _containerd_answers(self) -> bool:
        try:
            self.ctr("version", what="containerd version")
        except RuntimeError:
            return False
        return True

    def _start_containerd(self) -> None:
        if not (CNI_BIN_DIR / "bridge").exists():
            raise StackStartError(f"no CNI plugins in {CNI_BIN_DIR}: install containernet"
                                  "working-plugins (scripts/bootstrap.sh does)")
        argv = self.netns.nsenter(["containerd", "--config", str(self._containerd_config())])
        self.containerd = Process(f"containerd ({self.name})", argv,
                                  self.log_dir / "containerd.log", self._containerd_answers,
                                  stop_timeout=10)  # fmt: skip
        self.containerd.start(timeout=30)

    def _import_images(self) -> None:
        started = time.monotonic()
        for archive in self.image_archives:
            with archive.open("rb") as data:
                self.ctr("images", "import", "--no-unpack", "-", what=f"import of {archive}",
                         input_bytes=data.read())  # fmt: skip
        self.timings["image import"] = time.monotonic() - started

    def _kubelet_config(self, *, healthz_port: int) -> Path:
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.address, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
            # As the apiserver expects of a kubelet: it presents the CA-signed
            # apiserver-kubelet-client cert; everyone else is checked by webhook.
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.access.ca_cert)}},
            "authorization": {"mode": "Webhook"},
            # This host has cgroup v1 (hybrid), which 1.35+ refuses by default; no
            # systemd here, so the cgroupfs driver, under a root of this node's own.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup}", "cgroupsPerQOS": True,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "failSwapOn": False, "serializeImagePulls": False, "resolvConf": "",
            # Several nodes share one disk and one memory: evict only when truly short.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%",
                             "imagefs.available": "2%", "nodefs.inodesFree": "2%"},
            "registerWithTaints": [_taint(t) for t in self.taints],
            # No image garbage collection: the images were imported, there is no
            # registry to pull them again, and containerd 1.6 does not pin the sandbox
            # image. With the host's disk over 85% the kubelet deleted the pause image
            # and no pod could start.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            # Volume use (what ephemeral-storage evictions are judged on) is measured
            # every minute by default: an over-limit pod would run on for that long.
            "volumeStatsAggPeriod": "5s",
        }  # fmt: skip
        path = self.workdir / "kubelet" / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def _start_kubelet(self) -> None:
        pki = self.workdir / "pki"
        # The Node authorizer knows a kubelet by exactly this identity.
        cert, key = issue_client_cert(self.access, pki, stem="kubelet", group="system:nodes",
                                      user=f"system:node:{self.name}")  # fmt: skip
        kubeconfig = write_kubeconfig(
            self.workdir / "kubelet" / "kubeconfig",
            server=f"https://127.0.0.1:{self.access.port}", ca=self.access.ca_cert,
            cert=cert, key=key,
        )  # fmt: skip
        healthz_port = free_port(self.netns.path)
        make_cgroup_root(self.cgroup)
        record_kernel_tunables()
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        argv = self.netns.nsenter([
            str(bin_dir() / "kubelet"),
            f"--config={self._kubelet_config(healthz_port=healthz_port)}",
            f"--kubeconfig={kubeconfig}", f"--hostname-override={self.name}",
            f"--node-ip={self.address}", f"--root-dir={self.workdir / 'kubelet' / 'root'}",
            f"--cert-dir={pki}", *([f"--node-labels={labels}"] if labels else []), "--v=1",
        ])  # fmt: skip
        self.kubelet = Process(
            f"kubelet ({self.name})", argv, self.log_dir / "kubelet.log",
            lambda: _http_ok(self.netns.path, healthz_port, "/healthz"), stop_timeout=15,
        )  # fmt: skip
        self.kubelet.start(timeout=60)

    def stop_kubelet(self) -> None:
        """The kubelet alone, as in a kubelet restart: containers keep running."""
        if self.kubelet is not None:
            self.kubelet.stop()

    def start_kubelet(self, *, timeout: float = 60.0) -> None:
        self._start_kubelet()
        self.wait_ready(timeout=timeout)

    def kill_container(self, container_id: str) -> None:
        """SIGKILL a container's processes at once (``containerd://<id>`` or ``<id>``),
        as the kernel or a crash would; the kubelet sees it exit with 137."""
        task = container_id.removeprefix("containerd://")
        self.ctr("tasks", "kill", "--signal", "SIGKILL", "--all", task,
                 what=f"SIGKILL of container {task[:12]}")  # fmt: skip

    def pod_volume_dir(self, pod_uid: str, volume: str,
                       plugin: str = "kubernetes.io~empty-dir") -> Path:  # fmt: skip
        """Where the kubelet keeps a pod's volume on this node (an emptyDir by default)."""
        return self.workdir / "kubelet" / "root" / "pods" / pod_uid / "volumes" / plugin / volume

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubelet is None or not self.kubelet.running:
                break
            if self.ready():
                return
            time.sleep(0.3)
        log = self.kubelet.log_path if self.kubelet else self.log_dir / "kubelet.log"
        raise failed(f"node {self.name}", f"did not become Ready within {timeout:.0f}s", log)

    def node_status(self) -> dict[str, Any] | None:
        """The Node as the apiserver has it, read with the kubelet's own identity."""
        context = ssl.create_default_context(cafile=str(self.access.ca_cert))
        pki = self.workdir / "pki"
        context.load_cert_chain(str(pki / "kubelet.crt"), str(pki / "kubelet.key"))
        url = f"{self.access.server}/api/v1/nodes/{self.name}"
        try:
            # The URL is the apiserver's https one, never user input.
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
                node: dict[str, Any] = json.loads(resp.read())
                return node
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def ready(self) -> bool:
        """Ready as the scheduler sees it: the kubelet reports Ready *and* the node
        lifecycle controller has lifted the not-ready taint every kubelet registers
        with. The taint lags the condition by up to a node-monitor period, and a pod
        scheduled in that gap waits or is evicted."""
        node = self.node_status() or {}
        conditions = node.get("status", {}).get("conditions", [])
        taints = node.get("spec", {}).get("taints") or []
        return any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
        ) and not any(t.get("key") == NOT_READY_TAINT for t in taints)

    # -- stop --------------------------------------------------------------------

    def stop(self, *, graceful: bool = True) -> None:
        """Stops every process of the node and removes its containers, mounts,
        cgroups and namespace. ``graceful=False`` is a power cut: SIGKILL first."""
        errors: list[str] = []
        for proc in (self.kubelet, self.containerd):
            if proc is not None and graceful:
                proc.stop()
            elif proc is not None:
                proc.kill()
        steps: list[Callable[[], None]] = [
            lambda: kill_cgroup(self.cgroup), self._kill_shims,
            lambda: unmount_all(self.workdir), lambda: remove_cgroup(self.cgroup),
            self._stop_relays, self.netns.delete, self._remove_host_leftovers,
            restore_kernel_tunables,
        ]  # fmt: skip
        for step in steps:
            try:
                step()
            except (OSError, RuntimeError) as exc:
                errors.append(str(exc))
        self.kubelet = self.containerd = None
        if errors:
            raise RuntimeError(f"node {self.name} did not clean up fully: {'; '.join(errors)}")

    def kill(self) -> None:
        self.stop(graceful=False)

    def _kill_shims(self) -> None:
        """containerd leaves its shims running by design; they are this node's alone.
        A killed shim leaves its socket in /run/containerd/s, named by a hash of the
        containerd address, namespace and container id on its command line."""
        for pid in processes_with_arg(str(self.containerd_socket)):
            with contextlib.suppress(ProcessLookupError, OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                os.kill(pid, signal.SIGKILL)
                key = "/".join((str(self.containerd_socket), _after(argv, "-namespace"),
                                _after(argv, "-id")))  # fmt: skip
                Path("/run/containerd/s", hashlib.sha256(key.encode()).hexdigest()).unlink(
                    missing_ok=True
                )

    def _stop_relays(self) -> None:
        for relay in self.relays:
            relay.stop()
        self.relays = []

    def _remove_host_leftovers(self) -> None:
        """The two host paths the kubelet and libcni write whatever they are told: log
        symlinks in /var/log/containers and results in /var/lib/cni/results."""
        logs = str(self.workdir / "pod-logs")
        for link in Path("/var/log/containers").glob("*.log"):
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(logs):
                    link.unlink()
        results = Path("/var/lib/cni/results")
        for result in results.glob(f"{self.netns.name}-*"):
            sandbox = result.name[len(self.netns.name) + 1:].rsplit("-", 1)[0]
            # containerd's own loopback network keeps a result per sandbox too.
            for path in (result, results / f"cni-loopback-{sandbox}-lo"):
                path.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """What of this node still exists on the host (empty after ``stop()``)."""
        found = [f"mount {m}" for m in mounts_under(self.workdir)]
        found += [f"process {p}" for p in cgroup_pids(self.cgroup)]
        found += [f"shim {p}" for p in processes_with_arg(str(self.containerd_socket))]
        found += [f"cgroup {h / self.cgroup}" for h in v1_hierarchies()
                  if (h / self.cgroup).exists()]  # fmt: skip
        found += [f"cni result {r}" for r in
                  Path("/var/lib/cni/results").glob(f"{self.netns.name}-*")]  # fmt: skip
        if self.netns.path.exists():
            found.append(f"netns {self.netns.path}")
        return found

    def describe_failure(self) -> str:
        parts = [f"{name}:\n{log_tail(self.log_dir / f'{name}.log')}"
                 for name in ("containerd", "kubelet")]  # fmt: skip
        return "\n".join(parts)


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def _taint(spec: str) -> dict[str, str]:
    key_value, effect = spec.rsplit(":", 1)
    key, _, value = key_value.partition("=")
    return {"key": key, "value": value, "effect": effect}


# -- the scheduler -------------------------------------------------------------------


@dataclass
class Scheduler:
    """kube-scheduler on the host with its own identity (the bootstrap RBAC policy
    binds ``system:kube-scheduler``). ``scheduler_name`` other than the default lets a
    real node share a cluster with other binders: only pods naming it are scheduled."""

    workdir: Path
    access: ClusterAccess
    scheduler_name: str = "default-scheduler"
    process: Process | None = None

    def start(self, *, timeout: float = 60.0) -> None:
        if shutil.which("openssl") is None:
            raise StackStartError("openssl not found")
        cert, key = issue_client_cert(self.access, self.workdir / "pki", stem="scheduler",
                                      user="system:kube-scheduler")  # fmt: skip
        kubeconfig = write_kubeconfig(self.workdir / "scheduler.kubeconfig",
                                      server=self.access.server, ca=self.access.ca_cert,
                                      cert=cert, key=key)  # fmt: skip
        config = self.workdir / "scheduler.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "leaderElection": {"leaderElect": False},
            "profiles": [{"schedulerName": self.scheduler_name}],
        }))  # fmt: skip
        port = free_port()
        argv = [
            str(bin_dir() / "kube-scheduler"), f"--config={config}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'certs'}", "--v=1",
        ]  # fmt: skip
        # Only for its healthz: its serving cert is self-signed, made at start.
        insecure = ssl._create_unverified_context()  # noqa: S323

        def healthy() -> bool:
            try:
                url = f"https://127.0.0.1:{port}/healthz"
                with urllib.request.urlopen(url, timeout=2, context=insecure) as resp:
                    return bool(resp.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        self.process = Process("kube-scheduler", argv, self.workdir / "logs" / "scheduler.log",
                               healthy, stop_timeout=10)  # fmt: skip
        self.process.start(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

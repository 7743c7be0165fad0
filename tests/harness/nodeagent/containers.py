"""One container of a pod: its spec resolved to a launch, its state, its restarts."""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.nodeagent import images, runtime
from tests.harness.nodeagent.kubeapi import Api, ApiError
from tests.harness.nodeagent.podspec import (
    expand,
    field_value,
    memory_limit_bytes,
    now_rfc3339,
    resource_value,
)
from tests.harness.nodeagent.probes import Prober
from tests.harness.nodeagent.volumes import READ_ONLY_KINDS, Volume

Obj = dict[str, Any]
MAX_MESSAGE = 4096


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap/Secret/key is missing."""


@dataclass(frozen=True)
class NodeContext:
    """What every pod worker needs from the agent."""

    api: Api
    node_name: str
    host_ip: str
    pods_dir: Path
    image_map: Path
    apiserver_host: str
    apiserver_port: int
    capacity: Obj
    backoff_base_s: float
    backoff_max_s: float


class AdoptedProcess:
    """A container process left running by an earlier agent: watched through /proc."""

    def __init__(self, pid: int, start_ticks: str) -> None:
        self.pid = pid
        self._ticks = start_ticks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and _start_ticks(self.pid) != self._ticks:
            self.returncode = 137  # unless the exit file says otherwise
        return self.returncode


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :].split()[19]


Proc = subprocess.Popen[bytes] | AdoptedProcess


@dataclass
class Container:
    spec: Obj
    is_init: bool
    pod_dir: Path
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    restart_count: int = 0
    proc: Proc | None = None
    next_start: float = 0.0
    backoff: float = 0.0
    kill_reason: str = ""
    kill_deadline: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    probers: dict[str, Prober] = field(default_factory=dict)
    image_failures: int = 0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def dir(self) -> Path:
        return self.pod_dir / "containers" / self.name

    def log_file(self, restart: int | None = None) -> Path:
        n = self.restart_count if restart is None else restart
        return self.pod_dir / "logs" / self.name / f"{n}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def terminated(self) -> bool:
        return "terminated" in self.state

    def ready(self) -> bool:
        if not self.running:
            return False
        startup = self.probers.get("startup")
        if startup is not None and startup.result is not True:
            return False
        readiness = self.probers.get("readiness")
        return readiness is None or readiness.result is True

    def started(self) -> bool:
        startup = self.probers.get("startup")
        return self.running and (startup is None or startup.result is True)

    def status(self) -> Obj:
        image = str(self.spec.get("image", ""))
        out: Obj = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready(),
            "restartCount": self.restart_count,
            "image": image,
            "imageID": f"local://{images.repository(image)}",
            "started": self.started(),
        }
        if "waiting" not in self.state:
            out["containerID"] = (
                f"autoreduce://{self.pod_dir.name[:8]}-{self.name}-{self.restart_count}"
            )
        return out

    # -- signals ---------------------------------------------------------------------

    def kill(self, *, grace: float, reason: str = "") -> None:
        """SIGTERM now, SIGKILL once ``grace`` runs out (``tick`` escalates)."""
        if not self.running or self.proc is None:
            return
        if reason:
            self.kill_reason = reason
        if grace <= 0:
            runtime.signal_group(self.proc.pid, signal.SIGKILL)
            self.kill_deadline = time.monotonic()
            return
        if self.kill_deadline is None:
            runtime.signal_group(self.proc.pid, signal.SIGTERM)
            self.kill_deadline = time.monotonic() + grace

    def escalate(self) -> None:
        if (
            self.running
            and self.proc
            and self.kill_deadline
            and time.monotonic() >= self.kill_deadline
        ):
            runtime.signal_group(self.proc.pid, signal.SIGKILL)

    def memory_limit(self) -> int | None:
        return memory_limit_bytes(self.spec)

    # -- exit ------------------------------------------------------------------------

    def reap(self) -> Obj | None:
        """The terminated state once the process has exited, else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = runtime.read_exit_file(self.dir / "exit")
        if code is None:
            rc = self.proc.returncode if self.proc.returncode is not None else 137
            code = 128 - rc if rc < 0 else rc
        if self.kill_reason == "OOMKilled":
            code = 137
        reason = self.kill_reason or ("Completed" if code == 0 else "Error")
        started = self.state.get("running", {}).get("startedAt", now_rfc3339())
        term: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now_rfc3339(),
            "containerID": f"autoreduce://{self.pod_dir.name[:8]}-{self.name}-{self.restart_count}",
        }
        message = self._termination_message(code)
        if message:
            term["message"] = message
        self.proc, self.kill_reason, self.kill_deadline = None, "", None
        self.probers = {}
        return term

    def _termination_message(self, code: int) -> str:
        try:
            text = (
                (self.dir / "termination-log").read_bytes()[:MAX_MESSAGE].decode(errors="replace")
            )
        except OSError:
            text = ""
        policy = self.spec.get("terminationMessagePolicy", "File")
        if not text and code != 0 and policy == "FallbackToLogsOnError":
            try:
                lines = self.log_file().read_bytes().decode(errors="replace").splitlines()
            except OSError:
                lines = []
            text = "\n".join(lines[-80:])[-2048:]
        return text


# -- env -----------------------------------------------------------------------------


def _configmap(api: Api, ns: str, name: str) -> Obj | None:
    try:
        return api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise ConfigError(exc.message) from exc


def _secret(api: Api, ns: str, name: str) -> Obj | None:
    try:
        return api.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise ConfigError(exc.message) from exc


def _source_data(api: Api, ns: str, ref: Obj, *, secret: bool) -> dict[str, str] | None:
    obj = _secret(api, ns, ref["name"]) if secret else _configmap(api, ns, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return None
        kind = "secret" if secret else "configmap"
        raise ConfigError(f'{kind} "{ref["name"]}" not found')
    data = obj.get("data") or {}
    if secret:
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
    return dict(data)


def _value_from(api: Api, pod: Obj, container: Obj, src: Obj, ctx: NodeContext) -> str | None:
    ns = pod["metadata"]["namespace"]
    for key, secret in (("configMapKeyRef", False), ("secretKeyRef", True)):
        if key in src:
            ref = src[key]
            data = _source_data(api, ns, ref, secret=secret)
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    return None
                kind = "Secret" if secret else "ConfigMap"
                raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}")
            return data[ref["key"]]
    if "fieldRef" in src:
        return field_value(pod, src["fieldRef"]["fieldPath"], host_ip=ctx.host_ip)
    if "resourceFieldRef" in src:
        return resource_value(container, src["resourceFieldRef"], node_capacity=ctx.capacity)
    raise ConfigError(f"unsupported valueFrom {sorted(src)}")


def build_env(
    pod: Obj, container: Obj, image: images.ImageSpec, ctx: NodeContext
) -> dict[str, str]:
    """Image ENV, then the kubelet's service variables, then envFrom, then env (in order)."""
    env = {"PATH": images.DEFAULT_PATH, **image.env}
    host, port = ctx.apiserver_host, str(ctx.apiserver_port)
    env.update({
        "HOSTNAME": pod["metadata"]["name"],
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
    })  # fmt: skip
    env.setdefault("HOME", "/root")
    ns = pod["metadata"]["namespace"]
    for src in container.get("envFrom") or []:
        secret = "secretRef" in src
        ref = src.get("secretRef") or src.get("configMapRef") or {}
        data = _source_data(ctx.api, ns, ref, secret=secret) or {}
        prefix = src.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(ctx.api, pod, container, var["valueFrom"], ctx)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = expand(str(var.get("value", "")), env)
    return env


# -- launch --------------------------------------------------------------------------


def _security(pod: Obj, container: Obj) -> tuple[int | None, int | None, list[int], bool]:
    pod_sc = pod["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    groups = list(pod_sc.get("supplementalGroups") or [])
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and not uid:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    return uid, gid, groups, bool(sc.get("readOnlyRootFilesystem"))


def mounts_for(
    container: Obj, volumes: dict[str, Volume], env: dict[str, str]
) -> list[runtime.Mount]:
    mounts = []
    for vm in container.get("volumeMounts") or []:
        vol = volumes.get(vm["name"])
        if vol is None:
            raise ConfigError(f"volume {vm['name']} not found")
        source = vol.path
        sub = vm.get("subPath") or expand(vm.get("subPathExpr", ""), env)
        if sub:
            source = vol.path / sub
            if not source.exists() and vol.kind not in READ_ONLY_KINDS:
                source.mkdir(parents=True, exist_ok=True)  # as the kubelet does
                source.chmod(0o777)
        read_only = bool(vm.get("readOnly")) or vol.kind in READ_ONLY_KINDS
        mounts.append(runtime.Mount(source, vm["mountPath"], read_only, source.is_file()))
    return mounts


def _image_paths(env: dict[str, str]) -> list[str]:
    """The host folders an image's environment needs (its venv and PYTHONPATH)."""
    paths = [env[k] for k in ("VIRTUAL_ENV",) if env.get(k)]
    paths += [p for p in env.get("PYTHONPATH", "").split(":") if p]
    kept: list[str] = []
    for path in sorted({p.rstrip("/") or "/" for p in paths}, key=len):
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def launch(
    c: Container, pod: Obj, volumes: dict[str, Volume], image: images.ImageSpec, ctx: NodeContext
) -> None:
    """Start ``c``; raises ConfigError when it cannot be configured."""
    spec = c.spec
    env = build_env(pod, spec, image, ctx)
    command = spec.get("command") or image.command
    args = (
        spec.get("args")
        if spec.get("args") is not None
        else (image.args if not spec.get("command") else [])
    )
    argv = [expand(str(a), env) for a in [*command, *(args or [])]]
    if not argv:
        raise ConfigError("no command specified")
    uid, gid, groups, ro_root = _security(pod, spec)
    mounts = mounts_for(spec, volumes, env)
    c.dir.mkdir(parents=True, exist_ok=True)
    term_log = c.dir / "termination-log"
    term_log.write_bytes(b"")
    term_log.chmod(0o666)  # a non-root process must be able to write its message
    term_path = spec.get("terminationMessagePath") or "/dev/termination-log"
    mounts.append(runtime.Mount(term_log, term_path, False, True))
    launch_spec = runtime.LaunchSpec(
        argv=argv, env=env, mounts=mounts,
        working_dir=spec.get("workingDir") or image.working_dir or "/",
        log_file=c.log_file(), exit_file=c.dir / "exit",
        run_as_user=uid, run_as_group=gid, supplemental_groups=groups, read_only_root=ro_root,
        keep_visible=_image_paths(image.env),
        stage_dir=Path("/run/autoreduce-keep") / hashlib.sha256(bytes(c.dir)).hexdigest()[:16],
    )  # fmt: skip
    proc = runtime.launch(launch_spec)
    c.proc, c.env = proc, env
    (c.dir / "pid").write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")
    c.state = {"running": {"startedAt": now_rfc3339()}}
    started = time.monotonic()
    c.probers = {
        kind: Prober(kind, spec[f"{kind}Probe"], started)
        for kind in ("readiness", "liveness", "startup")
        if spec.get(f"{kind}Probe")
    }


def adopt(c: Container) -> bool:
    """Pick up a process an earlier agent started for this container, if it still runs."""
    try:
        pid_text, ticks = (c.dir / "pid").read_text().split()
    except (OSError, ValueError):
        return False
    pid = int(pid_text)
    if _start_ticks(pid) != ticks:
        return False
    c.proc = AdoptedProcess(pid, ticks)
    return True


def kill_stale(c: Container) -> None:
    if adopt(c) and c.proc is not None:
        runtime.signal_group(c.proc.pid, signal.SIGKILL)
        c.proc = None


def ns_pid(c: Container) -> int | None:
    """PID (host view) of the shell that is PID 1 of the container's namespaces."""
    if c.proc is None:
        return None
    kids = runtime.children_of(c.proc.pid)
    return kids[0] if kids else None

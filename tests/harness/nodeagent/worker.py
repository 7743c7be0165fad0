"""One thread per pod bound to this node, doing what the kubelet's pod worker does."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from datetime import UTC, datetime
from typing import Any

from tests.harness.nodeagent import images
from tests.harness.nodeagent.containers import (
    ConfigError,
    Container,
    NodeContext,
    adopt,
    kill_stale,
    launch,
    ns_pid,
)
from tests.harness.nodeagent.kubeapi import ApiError, pod_path
from tests.harness.nodeagent.podspec import (
    compute_phase,
    condition,
    merge_conditions,
    now_rfc3339,
)
from tests.harness.nodeagent.volumes import Volume, VolumeNotReady, prepare

Obj = dict[str, Any]
log = logging.getLogger("nodeagent.pod")

EVICT_ANNOTATION = "autoreduce.test/evict"
EVICT_MESSAGE = "The node was low on resource: memory. "
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
TICK_S = 0.1  # process exits are polled this often while anything runs


class PodWorker:
    def __init__(self, ctx: NodeContext, pod: Obj) -> None:
        self.ctx = ctx
        self.pod = pod
        self.uid = str(pod["metadata"]["uid"])
        self.dir = ctx.pods_dir / self.uid
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.gone = False  # the pod object no longer exists in the apiserver
        self.finished = False
        self.inits = [Container(c, True, self.dir) for c in pod["spec"].get("initContainers") or []]
        self.mains = [Container(c, False, self.dir) for c in pod["spec"]["containers"]]
        self.volumes: dict[str, Volume] | None = None
        self.volume_error = ""
        self.init_index = 0
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.terminal = False
        self.phase_fixed = False  # phase decided by a kill/deletion, not from container states
        self.stopping: tuple[str, str] | None = None  # (reason, message) of a pod-level kill
        self.start_time = now_rfc3339()
        self.started_mono = time.monotonic()
        self.conditions: list[Obj] = []
        self.last_sent = ""
        self.publish_after = 0.0  # after a failed status update, wait before the next try
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pod-{self.uid[:8]}")

    # -- called by the agent ---------------------------------------------------------

    def start(self) -> None:
        self._restore(self.pod.get("status") or {})
        self.thread.start()

    def update(self, pod: Obj) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def deleted(self) -> None:
        """The pod object is gone (force deletion): kill everything now."""
        self.gone = True
        self.wake.set()

    def containers(self) -> list[Container]:
        return [*self.inits, *self.mains]

    def find(self, name: str) -> Container | None:
        return next((c for c in self.containers() if c.name == name), None)

    def memory_check(self, rss: dict[int, int]) -> None:
        with self.lock:
            for c in self.containers():
                limit = c.memory_limit()
                if limit and c.running and c.proc and rss.get(c.proc.pid, 0) > limit:
                    log.info("pod %s container %s over memory limit: OOM kill", self.uid, c.name)
                    c.kill(grace=0, reason="OOMKilled")
                    self.wake.set()

    # -- main loop -------------------------------------------------------------------

    def _run(self) -> None:
        while not self.finished:
            busy = any(c.running for c in self.containers()) or not self.terminal
            # Idle terminal pods still tick: a status the apiserver missed is re-sent.
            self.wake.wait(TICK_S if busy else 1.0)
            self.wake.clear()
            try:
                with self.lock:
                    self._step()
            except Exception:
                log.exception("pod worker %s failed a step; retrying", self.uid)
                time.sleep(1)

    def _restore(self, status: Obj) -> None:
        """After an agent restart: keep what the apiserver already knows about this pod."""
        if status.get("phase") in ("Succeeded", "Failed"):
            self.phase, self.terminal, self.phase_fixed = status["phase"], True, True
            self.reason, self.message = status.get("reason", ""), status.get("message", "")
        if status.get("startTime"):
            self.start_time = status["startTime"]
            self.started_mono -= _age_s(status["startTime"])
        self.conditions = list(status.get("conditions") or [])
        known = {s["name"]: s for s in [*(status.get("initContainerStatuses") or []),
                                         *(status.get("containerStatuses") or [])]}  # fmt: skip
        for c in self.containers():
            old = known.get(c.name)
            if not old:
                continue
            c.restart_count = int(old.get("restartCount", 0))
            c.last_state = old.get("lastState") or {}
            if "terminated" in old.get("state", {}):
                c.state = old["state"]
            elif "running" in old.get("state", {}):
                c.state = old["state"]
                if self.terminal or not adopt(c):
                    c.state = {"terminated": {
                        "exitCode": 137, "reason": "ContainerStatusUnknown",
                        "message": "The container could not be located when the pod was terminated",
                        "finishedAt": now_rfc3339(),
                    }}  # fmt: skip
        self.init_index = sum(
            1 for c in self.inits if c.state.get("terminated", {}).get("exitCode") == 0
        )
        if self.terminal:
            for c in self.containers():
                kill_stale(c)
            # What the apiserver has is final: do not re-send a recomputed version of it.
            self.last_sent = json.dumps(self._status(), sort_keys=True)

    def _step(self) -> None:
        meta = self.pod["metadata"]
        if self.gone:
            self._kill_all(grace=0)
            if not any(c.running for c in self.containers()):
                self._finish()
            return
        if meta.get("deletionTimestamp"):
            self._step_deletion()
            return
        if self.terminal:
            self._publish()  # no-op unless the last attempt failed
            return
        if self.stopping is None:
            self._check_pod_kills()
        if self.stopping is not None:
            self._step_stopping()
        else:
            self._step_running()
        self._publish()

    def _check_pod_kills(self) -> None:
        annotations = self.pod["metadata"].get("annotations") or {}
        if annotations.get(EVICT_ANNOTATION) == "true":
            self.stopping = ("Evicted", EVICT_MESSAGE)
            self.conditions.append(
                condition("DisruptionTarget", True, reason="TerminationByKubelet",
                          message=EVICT_MESSAGE)
            )  # fmt: skip
            self._kill_all(grace=0)
            return
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and time.monotonic() - self.started_mono > float(deadline):
            self.stopping = ("DeadlineExceeded", DEADLINE_MESSAGE)
            self._kill_all(grace=self._grace())

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        value = meta.get("deletionGracePeriodSeconds")
        if value is None:
            value = spec.get("terminationGracePeriodSeconds", 30)
        return float(value)

    def _kill_all(self, *, grace: float) -> None:
        for c in self.containers():
            c.kill(grace=grace)
            if "waiting" in c.state:
                c.next_start = float("inf")
        for c in self.containers():
            c.escalate()
            self._reap(c, restart=False)

    def _step_stopping(self) -> None:
        self._kill_all(grace=self._grace())
        if any(c.running for c in self.containers()):
            return
        self.reason, self.message = self.stopping or ("", "")
        self.phase, self.terminal, self.phase_fixed = "Failed", True, True

    def _step_deletion(self) -> None:
        self._kill_all(grace=self._grace())
        if any(c.running for c in self.containers()):
            return
        if not self.terminal:
            statuses = [c.status() for c in self.mains]
            failed = any(s["state"].get("terminated", {}).get("exitCode", 0) != 0 for s in statuses)
            never_ran = any("waiting" in s["state"] for s in statuses)
            self.phase = "Failed" if failed or never_ran else "Succeeded"
            self.terminal, self.phase_fixed = True, True
        self._publish()
        self._finish()

    def _finish(self) -> None:
        """The kubelet's final delete (grace 0, this uid only), then forget the pod."""
        meta = self.pod["metadata"]
        if not self.gone:
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
            try:
                self.ctx.api.delete(pod_path(meta["namespace"], meta["name"]), body)
            except ApiError as exc:
                if exc.status not in (404, 409):
                    raise
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        self.finished = True

    # -- running ---------------------------------------------------------------------

    def _step_running(self) -> None:
        if self.volumes is None and not self._prepare_volumes():
            return
        if self.init_index < len(self.inits):
            self._step_init()
            if self.init_index < len(self.inits):
                return
        for c in self.mains:
            self._drive(c)
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if policy != "Always" and all(c.terminated for c in self.mains):
            self.terminal = True

    def _prepare_volumes(self) -> bool:
        try:
            self.volumes = prepare(
                self.ctx.api, self.pod, self.dir, host_ip=self.ctx.host_ip,
                capacity=self.ctx.capacity,
            )  # fmt: skip
            return True
        except VolumeNotReady as exc:
            self.volume_error = str(exc)
            self.wake.wait(1.0)  # like the kubelet's FailedMount retry, only quicker
            return False

    def _step_init(self) -> None:
        c = self.inits[self.init_index]
        self._drive(c)
        code = c.state.get("terminated", {}).get("exitCode")
        if code == 0:
            self.init_index += 1
            if self.init_index < len(self.inits):
                self._drive(self.inits[self.init_index])
        elif code is not None and self.pod["spec"].get("restartPolicy") == "Never":
            self.terminal = True

    def _drive(self, c: Container) -> None:
        if c.proc is None and "waiting" in c.state and time.monotonic() >= c.next_start:
            self._try_start(c)
        if c.proc is None:
            return
        c.escalate()
        if self._reap(c, restart=True):
            return
        self._probe(c)

    def _try_start(self, c: Container) -> None:
        image = images.resolve(str(c.spec.get("image", "")), images.load(self.ctx.image_map))
        if image is None:
            self._image_pull_failed(c)
            return
        c.image_failures = 0
        try:
            assert self.volumes is not None
            launch(c, self.pod, self.volumes, image, self.ctx)
        except ConfigError as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 1.0
        except OSError as exc:
            c.state = {"waiting": {"reason": "CreateContainerError", "message": str(exc)}}
            c.next_start = time.monotonic() + 1.0

    def _image_pull_failed(self, c: Container) -> None:
        image = c.spec.get("image", "")
        c.image_failures += 1
        if c.image_failures == 1:
            c.state = {"waiting": {
                "reason": "ErrImagePull",
                "message": f'failed to pull and unpack image "{image}": not in the node '
                           f"agent's image map {self.ctx.image_map}",
            }}  # fmt: skip
            c.next_start = time.monotonic() + 1.0
        else:
            c.state = {"waiting": {
                "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"',
            }}  # fmt: skip
            c.next_start = time.monotonic() + min(2.0 * c.image_failures, 10.0)

    def _reap(self, c: Container, *, restart: bool) -> bool:
        term = c.reap()
        if term is None:
            return False
        c.state = {"terminated": term}
        if restart and self._should_restart(c, term["exitCode"]):
            c.last_state = {"terminated": term}
            c.restart_count += 1
            base, cap = self.ctx.backoff_base_s, self.ctx.backoff_max_s
            c.backoff = base if c.backoff == 0 else min(c.backoff * 2, cap)
            c.next_start = time.monotonic() + c.backoff
            meta = self.pod["metadata"]
            c.state = {"waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {c.backoff:g}s restarting failed container={c.name} "
                           f"pod={meta['name']}_{meta['namespace']}({self.uid})",
            }}  # fmt: skip
        return True

    def _should_restart(self, c: Container, code: int) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if self.stopping is not None:
            return False
        if c.is_init:
            return policy != "Never" and code != 0
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _probe(self, c: Container) -> None:
        startup = c.probers.get("startup")
        pid = ns_pid(c)
        if startup is not None and startup.result is not True:
            startup.tick(c.spec, pid, c.env)
            if startup.result is False:
                c.kill(grace=self._grace())
            return
        for kind in ("readiness", "liveness"):
            prober = c.probers.get(kind)
            if prober is not None:
                prober.tick(c.spec, pid, c.env)
        liveness = c.probers.get("liveness")
        if liveness is not None and liveness.result is False:
            c.kill(grace=self._grace())

    # -- status ----------------------------------------------------------------------

    def _status(self) -> Obj:
        init_statuses = [c.status() for c in self.inits]
        statuses = [c.status() for c in self.mains]
        if self.init_index < len(self.inits):
            for s in statuses:
                if "waiting" in s["state"]:
                    s["state"] = {"waiting": {"reason": "PodInitializing"}}
        if self.volumes is None and self.volume_error:
            for s in [*init_statuses, *statuses]:
                s["state"] = {"waiting": {"reason": "ContainerCreating"}}
        init_done = self.init_index >= len(self.inits)
        init_failed = any(
            s["state"].get("terminated", {}).get("exitCode", 0) != 0 for s in init_statuses
        )
        phase = (
            self.phase
            if self.phase_fixed
            else compute_phase(
                self.pod, init_done=init_done, statuses=statuses, init_failed=init_failed
            )
        )
        if self.terminal and phase not in ("Succeeded", "Failed"):
            phase = "Failed"
        self.phase = phase
        containers_ready = phase == "Running" and all(s["ready"] for s in statuses)
        done = phase in ("Succeeded", "Failed")
        not_ready = "" if containers_ready else ("PodCompleted" if done else "ContainersNotReady")
        ip = self.ctx.host_ip
        not_init = "" if init_done else "ContainersNotInitialized"
        conditions = [
            condition("PodReadyToStartContainers", self.volumes is not None and not self.terminal),
            condition("Initialized", init_done, reason=not_init),
            condition("Ready", containers_ready, reason=not_ready),
            condition("ContainersReady", containers_ready, reason=not_ready),
            condition("PodScheduled", True),
        ]  # fmt: skip
        extra = [c for c in self.conditions if c["type"] == "DisruptionTarget"]
        self.conditions = merge_conditions(self.conditions, conditions) + extra
        status: Obj = {
            "phase": phase,
            "conditions": self.conditions,
            "hostIP": ip, "hostIPs": [{"ip": ip}], "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
        }  # fmt: skip
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        return status

    def _publish(self) -> None:
        status = self._status()
        text = json.dumps(status, sort_keys=True)
        if text == self.last_sent or time.monotonic() < self.publish_after:
            return
        meta = self.pod["metadata"]
        try:
            self.ctx.api.patch(
                pod_path(meta["namespace"], meta["name"], "status"), {"status": status}
            )
            self.last_sent = text
        except ApiError as exc:
            if exc.status == 404:
                self.gone = True
            else:
                self.publish_after = time.monotonic() + 1.0
                log.warning("status of %s/%s not sent: %s", meta["namespace"], meta["name"], exc)


def _age_s(timestamp: str) -> float:
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return max(0.0, (datetime.now(UTC) - then).total_seconds())

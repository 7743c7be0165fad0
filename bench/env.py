"""The real stack for benchmarks and the instruments that watch it.

Uses devstack: an ActiveMQ broker as a plain process, the local control
plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, a real node) and the real
``python -m dispatcher`` process. The bench process itself watches Jobs and stamps
each event with the monotonic clock on arrival (creationTimestamp has 1 s
resolution), reads the apiserver's own /metrics, and samples the dispatcher's
/proc entries.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import ssl
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings, QueueNames
from autoreduce_common.messages import parse_run
from autoreduce_common.stomp_client import Delivery, StompClient
from kubernetes import client as k8s

from devstack.product import RUNNER_UID, DispatcherProcess, Facility, dispatcher_settings
from devstack.stack import Stack as DevStack
from dispatcher import admission
from dispatcher.identity import job_name, run_key
from dispatcher.kube import Gone, Kube, KubeError

SELECTOR = "autoreduce.io/managed=true"
# No node carries this label: runner pods stay Pending (nothing runs, no node load).
NEVER_SCHEDULED = {"autoreduce.bench/never": "true"}
# The runner "reduction": exit 0 at once, or wait for the file $BENCH_GATE first.
RUNNER_COMMAND = [
    "sh", "-c",
    'if [ -n "$BENCH_GATE" ]; then while [ ! -e "$BENCH_GATE" ]; do sleep 0.02; done; fi',
]  # fmt: skip
UNLIMITED = 1e9  # client-side QPS for the bench's own clients and "the limit"


@dataclass
class Stack(DevStack):
    """devstack's stack plus what every scenario shares."""

    # Dispatcher settings for every scenario (e.g. a different API budget, --api-qps).
    dispatcher_overrides: dict[str, Any] = field(default_factory=dict)

    def broker_settings(self, tag: str) -> BrokerSettings:
        queues = QueueNames(
            **{name: f"{value}.{tag}" for name, value in QueueNames().model_dump().items()}
        )
        return BrokerSettings(
            hosts=[self.broker.host], username=self.broker.user, password=self.broker.password,
            heartbeat_ms=10000, reconnect_initial_s=0.2, reconnect_max_s=2.0, queues=queues,
        )  # fmt: skip

    def kube_client(self, namespace: str, *, qps: float = UNLIMITED) -> Kube:
        return Kube.connect(
            kubeconfig=self.kube.kubeconfig, namespace=namespace, qps=qps, burst=int(min(qps, 1e6))
        )

    # -- the apiserver's own counters ------------------------------------------------

    def request_totals(self) -> Counter[str]:
        """apiserver_request_total summed by "VERB group/resource[/subresource]"."""
        assert self.kube.pki is not None
        context = ssl.create_default_context(cafile=str(self.kube.pki.ca.cert))
        context.load_cert_chain(str(self.kube.pki.admin.cert), str(self.kube.pki.admin.key))
        with urllib.request.urlopen(  # noqa: S310 - our own apiserver over https
            f"{self.kube.server}/metrics", timeout=30, context=context
        ) as response:
            text = response.read().decode()
        totals: Counter[str] = Counter()
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            resource = labels.get("resource", "")
            if labels.get("group"):
                resource = f"{labels['group']}/{resource}"
            if labels.get("subresource"):
                resource += f"/{labels['subresource']}"
            totals[f"{labels.get('verb', '')} {resource}"] += int(float(line.rsplit(" ", 1)[1]))
        return totals

    def etcd_db_mb(self) -> float | None:
        """Size of etcd's database file (what the cluster's objects cost on disk), in MB."""
        db = self.kube.workdir / "etcd-data" / "member" / "snap" / "db"
        return db.stat().st_size / 1e6 if db.exists() else None


# -- one scenario's corner of the stack -----------------------------------------------


def _scenario_tag() -> str:
    return uuid.uuid4().hex[:6]


@dataclass
class Scenario:
    """A fresh namespace and queues; a dispatcher; a Job watch; senders."""

    stack: Stack
    name: str
    tag: str = field(default_factory=_scenario_tag)
    namespace: str = ""
    broker: BrokerSettings | None = None
    dispatcher: DispatcherProcess | None = None
    watcher: JobWatcher | None = None

    def __post_init__(self) -> None:
        self.namespace = f"bench-{self.name}-{self.tag}"
        self.broker = self.stack.broker_settings(self.tag)
        self.stack.kube.create_namespace(self.namespace)
        # Runner pods mount the runners' broker password Secret.
        with self.stack.kube.api_client() as api:
            secret = k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(name="autoreduce-broker"),
                string_data={"password": self.stack.broker.runner.password},
            )
            k8s.CoreV1Api(api).create_namespaced_secret(self.namespace, secret)

    @property
    def workdir(self) -> Path:
        return self.stack.workdir / "scenarios" / f"{self.name}-{self.tag}"

    def events_by_reporter(self) -> Counter[str]:
        """This namespace's Events counted by the controller that reported them: the
        apiserver's request counter cannot tell the dispatcher's Event writes from the
        scheduler's (one ``FailedScheduling`` or ``Scheduled`` per pod, same API)."""
        counts: Counter[str] = Counter()
        token = None
        with self.stack.kube.api_client() as api:
            events = k8s.EventsV1Api(api)
            while True:
                # Raw JSON: the client's models reject Events written through core/v1
                # (the Job controller's), which have no eventTime.
                raw = events.list_namespaced_event(self.namespace, limit=500, _continue=token,
                                                   _preload_content=False)  # fmt: skip
                page = json.loads(raw.data)  # type: ignore[attr-defined]  # a raw response
                counts.update(e.get("reportingController") or "?" for e in page["items"])
                token = page["metadata"].get("continue")
                if not token:
                    return counts

    def settings(self, *, runs_pods: bool, **overrides: Any) -> dict[str, Any]:
        """The dispatcher's settings: defaults (incl. the API budget) but a bench runner."""
        assert self.broker is not None
        password = self.workdir / "broker-password"
        password.parent.mkdir(parents=True, exist_ok=True)
        amq = self.stack.broker
        password.write_text(amq.dispatcher.password)
        settings = dispatcher_settings(
            broker=amq.settings_for(amq.dispatcher, self.broker), password_file=password,
            runner_username=amq.runner.user, namespace=self.namespace,
            facility=Facility(self.workdir / "facility"), run_as_user=None,
            runner_image=self.stack.kube.image("autoreduce-runner"),
        )  # fmt: skip
        settings.pop("concurrency", None)  # the product's default, not the harness's
        settings["log_level"] = "INFO"
        settings["runner"] = {
            # The runner image, but its command is a plain shell (no Python start-up,
            # so the node stays quiet); the gate file reaches it through a hostPath.
            "image": self.stack.kube.image("autoreduce-runner"),
            "image_pull_policy": "Never",
            "command": RUNNER_COMMAND,
            "archive_volumes": [{"name": "bench", "mount_path": str(self.workdir),
                                 "source": {"hostPath": {"path": str(self.workdir)}}}],
            "run_as_user": None,
            "run_as_group": None,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                          "limits": {"memory": "256Mi"}},
            "node_selector": {} if runs_pods else NEVER_SCHEDULED,
            "active_deadline_seconds": 3600,
        }  # fmt: skip
        settings.update(self.stack.dispatcher_overrides)
        settings.update(overrides)
        return settings

    @property
    def facility(self) -> Facility:
        return Facility(self.workdir / "facility")

    def real_runner_settings(self) -> dict[str, Any]:
        """The dispatcher's settings with the real runner (Python, the script, the
        broker) on this scenario's facility folders, as the tests run it."""
        assert self.broker is not None
        self.facility.create()
        password = self.workdir / "broker-password"
        amq = self.stack.broker
        password.write_text(amq.dispatcher.password)
        settings = dispatcher_settings(
            broker=amq.settings_for(amq.dispatcher, self.broker), password_file=password,
            runner_username=amq.runner.user, namespace=self.namespace, facility=self.facility,
            run_as_user=RUNNER_UID, runner_image=self.stack.kube.image("autoreduce-runner"),
        )  # fmt: skip
        settings.pop("concurrency", None)
        settings["log_level"] = "INFO"
        settings.update(self.stack.dispatcher_overrides)
        return settings

    def data_file(self, instrument: str, run: int) -> str:
        """A raw file in the facility's archive; its path as pods see it."""
        return self.facility.data_file(instrument, run)

    def broker_queue(self, name: str) -> str:
        assert self.broker is not None
        return str(getattr(self.broker.queues, name))

    def outcome_reader(self) -> OutcomeClock:
        assert self.broker is not None
        q = self.broker.queues
        return OutcomeClock(self.broker, [q.started, q.complete, q.error])

    def start_dispatcher(self, settings: dict[str, Any], *, name: str = "dispatcher") -> None:
        # The real main, under a profiler that stays off until profile_start().
        self.dispatcher = DispatcherProcess(
            workdir=self.workdir, settings=settings, kubeconfig=self.stack.kube.kubeconfig,
            name=name, module="bench.profiled",
            extra_env={"AUTOREDUCE_PROFILE_OUT": str(self.profile_path)},
        ).start()  # fmt: skip

    @property
    def profile_path(self) -> Path:
        return self.workdir / "profile.json"

    def profile_start(self) -> None:
        assert self.dispatcher is not None and self.dispatcher.process is not None
        self.profile_path.unlink(missing_ok=True)
        self.dispatcher.process.send_signal(signal.SIGUSR1)

    def profile_stop(self, *, timeout: float = 60) -> dict[str, Any]:
        """The dispatcher's wall-clock profile since profile_start() (bench/profiled.py)."""
        assert self.dispatcher is not None and self.dispatcher.process is not None
        self.dispatcher.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.profile_path.exists():  # renamed into place when complete
                loaded: dict[str, Any] = json.loads(self.profile_path.read_text())
                return loaded
            time.sleep(0.2)
        return {"error": f"no profile written within {timeout} s"}

    def start_watch(self) -> JobWatcher:
        self.watcher = JobWatcher(self.stack.kube_client(self.namespace))
        self.watcher.start()
        return self.watcher

    def sender(self) -> StompClient:
        assert self.broker is not None
        client = StompClient(settings=self.broker, client_name=f"bench-{self.name}")
        client.connect()
        return client

    def send_one(self, message: bytes) -> bytes:
        """Send one run message now (receipt awaited); returns it."""
        self.send_all([message], threads=1)
        return message

    def send_all(self, messages: list[bytes], *, threads: int = 4) -> float:
        """Send as fast as the broker takes them (receipts awaited); returns seconds."""
        assert self.broker is not None
        pending = self.broker.queues.pending
        chunks = [messages[i::threads] for i in range(threads)]
        started = time.monotonic()

        def send(chunk: list[bytes]) -> None:
            client = self.sender()
            try:
                for body in chunk:
                    client.send(destination=pending, body=body, priority=4)
            finally:
                client.disconnect()

        workers = [threading.Thread(target=send, args=(c,)) for c in chunks if c]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.monotonic() - started

    def queue_depth(self) -> int:
        """Messages still on the pending queue (browsed, not consumed; in-flight included)."""
        assert self.broker is not None
        client = StompClient(settings=self.broker, client_name="bench-browser")
        client.connect()
        sink: queue.Queue[Delivery] = queue.Queue()
        try:
            client.subscribe(destination=self.broker.queues.pending, sink=sink, prefetch=1000,
                             headers={"browser": "true"})  # fmt: skip
            count = 0
            while True:
                delivery = sink.get(timeout=30)
                if delivery.headers.get("browser") == "end":
                    return count
                count += 1
        finally:
            client.disconnect()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()


class OutcomeClock:
    """Outcome messages stamped with the monotonic clock as they arrive."""

    def __init__(self, settings: BrokerSettings, destinations: list[str]) -> None:
        self._client = StompClient(settings=settings, client_name="bench-outcomes")
        self._client.connect()
        self._sink: queue.Queue[Delivery] = queue.Queue()
        for destination in destinations:
            self._client.subscribe(destination=destination, sink=self._sink, prefetch=100)
        self.arrived: dict[tuple[str, int], float] = {}  # the first of each
        self.counts: Counter[tuple[str, int]] = Counter()  # every copy

    def wait_for_run(self, destination: str, run: int, *, timeout: float) -> float:
        """When the run's message reached ``destination`` (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        while (destination, run) not in self.arrived:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message for run {run} on {destination}")
            self._take(timeout=remaining)
        return self.arrived[(destination, run)]

    def drain(self, seconds: float) -> None:
        """Take what arrives for ``seconds`` more (repeats included)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._take(timeout=remaining)

    def _take(self, *, timeout: float) -> None:
        try:
            delivery = self._sink.get(timeout=timeout)
        except queue.Empty:
            return
        at = time.monotonic()
        self._client.ack(delivery)
        key = (delivery.destination, int(json.loads(delivery.body).get("run_number")))
        self.arrived.setdefault(key, at)
        self.counts[key] += 1

    def close(self) -> None:
        self._client.disconnect()


# -- messages ---------------------------------------------------------------------------


def run_body(*, instrument: str, rb: int, run: int, data: str | None = None,
             script: str = "def main(input_file, output_dir):\n    pass\n") -> bytes:
    """A run message as a legacy producer sends it (small script, like most)."""
    message = {
        "data": data or
        f"/isis/NDX{instrument}/Instrument/data/cycle_23_4/{instrument}{run:08d}.nxs",
        "facility": "ISIS",
        "instrument": instrument,
        "rb_number": rb,
        "run_number": run,
        "run_version": 0,
        "reduction_script": script,
        "reduction_arguments": {"standard_vars": {}, "advanced_vars": {}},
        "started_by": 0,
    }
    return json.dumps(message).encode()


def job_of(body: bytes) -> str:
    """The Job name the dispatcher derives from the run (deterministic)."""
    return job_name(run_key(parse_run(body)[1]))


# -- watching Jobs from the bench process ------------------------------------------------


class JobWatcher:
    """Arrival times (monotonic) of each Job's events, keyed by Job name."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube
        self.added: dict[str, float] = {}
        self.unsuspended: dict[str, float] = {}
        self.finished: dict[str, float] = {}  # first terminal condition (any)
        self.complete: dict[str, float] = {}  # the Complete=True condition
        self.rb: dict[str, str] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._synced = threading.Event()

    def start(self) -> None:
        self._thread.start()
        if not self._synced.wait(60):
            raise RuntimeError("the bench's Job watch did not start")

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                jobs, version = self._kube.list_jobs(selector=SELECTOR)
                now = time.monotonic()
                for job in jobs:
                    self._record(job, now)
                self._synced.set()
                while not self._stop.is_set():
                    for event in self._kube.watch_jobs(
                        selector=SELECTOR, resource_version=version, timeout_s=120
                    ):
                        now = time.monotonic()
                        version = event.obj.get("metadata", {}).get("resourceVersion", version)
                        if event.kind in ("ADDED", "MODIFIED"):
                            self._record(event.obj, now)
            except Gone:
                continue
            except KubeError:
                time.sleep(0.2)

    def _record(self, job: dict[str, Any], now: float) -> None:
        name = admission.name_of(job)
        status = job.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        with self._cond:
            self.added.setdefault(name, now)
            labels = job.get("metadata", {}).get("labels") or {}
            self.rb.setdefault(name, str(labels.get("autoreduce.io/rb-number", "")))
            if not admission.is_suspended(job):
                self.unsuspended.setdefault(name, now)
            if admission.is_finished(job):
                self.finished.setdefault(name, now)
            if conditions.get("Complete") == "True":
                self.complete.setdefault(name, now)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[JobWatcher], bool], *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 1.0))
            return True

    def count(self, table: dict[str, float], names: Iterable[str]) -> int:
        with self._cond:
            return sum(1 for name in names if name in table)


# -- the dispatcher process as the kernel sees it -------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) in MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS

"""A busy cycle on real nodes: bursts of run detection and a rerun campaign against a
node pool that grows when reduction pods pend, as the cluster autoscaler grows one.

The pool's nodes carry a label and a NoSchedule taint only this scenario's instrument
selects and tolerates, and each reduction asks for 60 % of a node's CPU, so one fits a
node: every run beyond the pool's size pends ``Unschedulable`` (the autoscaler's signal).
The bench's own autoscaler adds a node (``LocalKube.add_node``, a real kubelet) when a
pod has pended for ``SCALE_UP_AFTER_S``, up to ``max_nodes``, and removes a node that
has had no reduction pod for ``SCALE_DOWN_AFTER_S``, as the real one does (it never
takes a node with a pod that says safe-to-evict "false"). A sampler records, once a
second, what an operator would watch: runs waiting (suspended Jobs), pods pending,
pods running, nodes in the pool; ``bench/plot.py`` draws it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s

from bench.env import Scenario, Stack, run_body
from bench.machine import load

INSTRUMENT = "CYCLE"
POOL_KEY = "autoreduce.bench/pool"
POOL = "cycle"
SCALE_UP_AFTER_S = 5.0
SCALE_DOWN_AFTER_S = 20.0
SCRIPT_SECONDS = 8
CYCLE_SCRIPT = f"""
import time
def main(input_file, output_dir):
    time.sleep({SCRIPT_SECONDS})
"""


@dataclass(frozen=True)
class Wave:
    """Runs sent at ``at_s`` into the cycle: ``runs`` over ``rbs`` RBs at JMS priority."""

    at_s: float
    runs: int
    rbs: int
    priority: int  # 9 run detection, 0 reruns
    label: str


def pattern(scale: int) -> list[Wave]:
    """A cycle's shape: run detection in small bursts, a rerun campaign on top."""
    if scale <= 0:  # the tiny smoke run: two bursts, one wave of reruns
        return [Wave(0, 2, 2, 9, "run detection"), Wave(5, 2, 1, 0, "rerun campaign")]
    return [
        Wave(0, 3 * scale, 3 * scale, 9, "run detection"),
        Wave(15, 2 * scale, 2 * scale, 9, "run detection"),
        Wave(25, 12 * scale, 4 * scale, 0, "rerun campaign"),
        Wave(45, 3 * scale, 3 * scale, 9, "run detection"),
    ]


@dataclass
class Pool:
    """The autoscaled node pool and its bench-side autoscaler."""

    stack: Stack
    max_nodes: int
    names: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _next: int = 1

    def add(self, started: float) -> None:
        name = f"cycle-{self._next}"
        self._next += 1
        began = time.monotonic()
        self.stack.kube.add_node(name, labels={POOL_KEY: POOL},
                                 taints=[f"{POOL_KEY}={POOL}:NoSchedule"])  # fmt: skip
        self.names.append(name)
        self.events.append({"t": round(time.monotonic() - started, 1), "event": "node added",
                            "node": name, "ready_after_s": round(time.monotonic() - began, 1)})

    def remove(self, name: str, started: float) -> None:
        self.names.remove(name)
        self.stack.kube.remove_node(name)
        self.events.append({"t": round(time.monotonic() - started, 1), "event": "node removed",
                            "node": name})

    def remove_all(self) -> None:
        for name in list(self.names):
            self.names.remove(name)
            self.stack.kube.remove_node(name)


MANAGED = "autoreduce.io/managed=true"


def _pods(core: k8s.CoreV1Api, namespace: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=MANAGED).items)


def _unschedulable(pod: Any) -> bool:
    return any(c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
               for c in pod.status.conditions or [])  # fmt: skip


def _live(pod: Any) -> bool:
    return pod.status.phase not in ("Succeeded", "Failed")


def _suspended(job: Any) -> bool:
    return bool(job.spec and job.spec.suspend)


def finished_job(job: Any) -> bool:
    return any(c.type in ("Complete", "Failed") and c.status == "True"
               for c in job.status.conditions or [])  # fmt: skip


def _autoscale(core: k8s.CoreV1Api, namespace: str, pool: Pool, started: float,
               stop: threading.Event) -> None:
    """Scale up on a pod pending Unschedulable for a while; down on an empty node."""
    pending_since: dict[str, float] = {}
    idle_since: dict[str, float] = {}
    while not stop.wait(1.0):
        now, pods = time.monotonic(), _pods(core, namespace)
        waiting = {p.metadata.name for p in pods if _live(p) and _unschedulable(p)}
        pending_since = {n: pending_since.get(n, now) for n in waiting}
        if (pending_since and len(pool.names) < pool.max_nodes
                and now - min(pending_since.values()) >= SCALE_UP_AFTER_S):
            pool.add(started)
            pending_since.clear()
            continue
        busy = {p.spec.node_name for p in pods if _live(p) and p.spec.node_name}
        for name in pool.names[1:]:  # the pool keeps one node, as a min size of 1
            if name in busy:
                idle_since.pop(name, None)
            elif now - idle_since.setdefault(name, now) >= SCALE_DOWN_AFTER_S:
                idle_since.pop(name)
                pool.remove(name, started)
                break


def _cpu_request(core: k8s.CoreV1Api, node: str) -> str:
    """60 % of a pool node's allocatable CPU: one reduction fits a node, two do not."""
    allocatable = str(core.read_node(node).status.allocatable["cpu"])  # type: ignore[union-attr,index]
    millis = int(allocatable[:-1]) if allocatable.endswith("m") else int(allocatable) * 1000
    return f"{millis * 6 // 10}m"


def cycle(stack: Stack, *, scale: int, max_nodes: int) -> dict[str, Any]:
    scenario = Scenario(stack, "cycle")
    pool = Pool(stack, max_nodes=max_nodes)
    stop = threading.Event()
    autoscaler: threading.Thread | None = None
    try:
        pool.add(time.monotonic())
        with stack.kube.api_client() as api:
            core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
            settings = scenario.real_runner_settings()
            settings["instruments"] = {INSTRUMENT: {
                "node_selector": {POOL_KEY: POOL},
                "tolerations": [{"key": POOL_KEY, "operator": "Equal", "value": POOL,
                                 "effect": "NoSchedule"}],
                "resources": {"requests": {"cpu": _cpu_request(core, pool.names[0]),
                                           "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
            }}  # fmt: skip
            scenario.start_dispatcher(settings)
            reader = scenario.outcome_reader()
            played = Cycle(scenario, core, batch, pool, started=time.monotonic())
            pool.events.clear()
            autoscaler = threading.Thread(
                target=_autoscale, args=(core, scenario.namespace, pool, played.started, stop),
                name="bench-autoscaler", daemon=True)
            autoscaler.start()
            waves = pattern(scale)
            sent = played.play(waves)
            total = len(sent)
            played.until(lambda: played.series[-1]["finished"] >= total,
                         timeout=60 + 30 * total)
            # Then the pool shrinks back to its one node.
            played.until(lambda: len(pool.names) <= 1,
                         timeout=SCALE_DOWN_AFTER_S * (max_nodes + 1) + 30)
            outcomes = _outcomes(reader, scenario, sent)
            reader.close()
        series = played.series
        return {
            "what": (f"{total} real runs ({SCRIPT_SECONDS} s scripts) in {len(waves)} waves "
                     f"against a pool of 1-{max_nodes} nodes, one reduction per node; "
                     f"a node is added after a pod pends Unschedulable {SCALE_UP_AFTER_S:g} s "
                     f"and removed after {SCALE_DOWN_AFTER_S:g} s empty"),
            "waves": [w.__dict__ for w in waves],
            "runs": total,
            "outcomes": outcomes,
            "max_pending": max(s["pending"] for s in series),
            "max_nodes_used": max(s["nodes"] for s in series),
            "all_finished_s": next((s["t"] for s in series if s["finished"] >= total), None),
            "pool_events": pool.events,
            "series": series,
            "load": load(),
        }
    finally:
        stop.set()
        if autoscaler is not None:
            autoscaler.join(timeout=60)
        scenario.stop()
        pool.remove_all()


@dataclass
class Cycle:
    """One cycle being played: the clients, the pool, and the samples so far."""

    scenario: Scenario
    core: k8s.CoreV1Api
    batch: k8s.BatchV1Api
    pool: Pool
    started: float
    series: list[dict[str, Any]] = field(default_factory=list)

    def sample(self) -> dict[str, Any]:
        namespace = self.scenario.namespace
        jobs = self.batch.list_namespaced_job(namespace, label_selector=MANAGED).items
        pods = _pods(self.core, namespace)
        return {
            "t": round(time.monotonic() - self.started, 1),
            "waiting": sum(1 for j in jobs if _suspended(j) and not finished_job(j)),
            "pending": sum(1 for p in pods if p.status.phase == "Pending"
                           and not p.spec.node_name),
            "running": sum(1 for p in pods if p.status.phase == "Running"),
            "nodes": len(self.pool.names),
            "finished": sum(1 for j in jobs if finished_job(j)),
        }

    def until(self, done: Callable[[], bool], *, timeout: float) -> None:
        """Sample once a second until ``done()``; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.series.append(self.sample())
            if done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"busy cycle: not done after {timeout:.0f} s: "
                                   f"{self.series[-1]}")
            time.sleep(1.0)

    def play(self, waves: list[Wave]) -> list[int]:
        """Send each wave at its time, sampling meanwhile; returns the runs sent."""
        scenario = self.scenario
        assert scenario.broker is not None
        sender = scenario.sender()
        runs: list[int] = []
        try:
            for index, wave in enumerate(waves):
                due = self.started + wave.at_s
                self.until(lambda: time.monotonic() >= due,  # noqa: B023 - called at once
                           timeout=wave.at_s + 5)
                for number in range(wave.runs):
                    run = 900_000 + index * 1000 + number
                    rb = 7_000_000 + index * 100 + number % wave.rbs
                    body = run_body(instrument=INSTRUMENT, rb=rb, run=run, script=CYCLE_SCRIPT,
                                    data=scenario.data_file(INSTRUMENT, run))
                    sender.send(destination=scenario.broker.queues.pending, body=body,
                                priority=wave.priority)
                    runs.append(run)
                self.pool.events.append({"t": round(time.monotonic() - self.started, 1),
                                         "event": f"{wave.runs} runs ({wave.label})"})
        finally:
            sender.disconnect()
        return runs


def _outcomes(reader: Any, scenario: Scenario, runs: list[int]) -> dict[str, Any]:
    """Each run's final outcomes: exactly one each, or the runs that had not."""
    complete, error = scenario.broker_queue("complete"), scenario.broker_queue("error")
    for run in runs:
        with contextlib.suppress(TimeoutError):  # counted below as missing
            reader.wait_for_run(complete, run, timeout=60)
    reader.drain(3)
    finals: Counter[int] = Counter()
    for (queue, run), count in reader.counts.items():
        if queue in (complete, error):
            finals[run] += count
    return {"complete": sum(c for (q, _), c in reader.counts.items() if q == complete),
            "error": sum(c for (q, _), c in reader.counts.items() if q == error),
            "runs_without_exactly_one": sorted(r for r in runs if finals[r] != 1)}

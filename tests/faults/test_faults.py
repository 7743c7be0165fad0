"""Faults during a burst, on the real local stack (issue 9): nothing lost, nothing
duplicated, no RB running two runs at once, every queue drained.

Short versions run in CI; the long ones (``pytest --long tests/faults``) are the
figures in bench/results/faults.md. Each test prints its figures and records them.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from kubernetes import client as k8s

from devstack.activemq import free_port
from devstack.product import DispatcherProcess, Facility
from tests.faults.support import (
    Collector,
    Figures,
    PodRecorder,
    Producer,
    burst,
    http_status,
    judge,
    list_jobs,
    record,
    timeline_script,
    wait_ready,
)
from tests.harness.pods import kill_container

pytestmark = pytest.mark.integration

# Failed runs are retried as the next version after 1 s (not the default 300 s) so a
# killed runner's retry is part of the burst we judge. Concurrency is the product's
# default (1: prefetch 1), not the harness's 4: the faults are judged on what ships.
FAULT_SETTINGS: dict[str, Any] = {
    "retries": {"mode": "dispatcher", "max_attempts": 3, "delay_s": 1},
    "concurrency": 1,
}


@dataclass
class Scenario:
    """One burst with faults injected by ``inject`` while it runs."""

    name: str
    mode: str
    runs: int
    rbs: int
    kube: Any
    namespace: str
    facility: Facility
    broker_settings: BrokerSettings
    start_dispatcher: Callable[..., DispatcherProcess]
    script: str = timeline_script(0.02)
    repetition: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    dispatcher: DispatcherProcess | None = None
    port: int = 0
    collector: Collector | None = None
    producer: Producer | None = None
    figures: Figures | None = None
    cleared: list[float] = field(default_factory=list)

    def progress(self) -> int:
        assert self.collector is not None
        return len(self.collector.finals())

    def wait_progress(self, fraction: float, *, timeout: float = 300) -> None:
        target = int(self.runs * fraction)
        assert self.collector is not None
        self.collector.wait(lambda: self.progress() >= target, timeout=timeout,
                            what=f"{target} outcomes")

    def fault(self) -> None:
        assert self.figures is not None
        self.figures.faults += 1

    def recovered(self) -> None:
        """The fault is lifted now: time the dispatcher's way back to Ready."""
        assert self.figures is not None
        self.cleared.append(time.monotonic())
        self.figures.recovery_s.append(wait_ready(self.port, timeout=180))

    def run(self, inject: Callable[[Scenario], None], *, timeout: float,
            dead_letters: int = 0) -> Figures:
        self.port = free_port()
        self.figures = Figures(self.name, self.mode, self.runs, self.rbs, faults=0,
                               repetition=self.repetition)
        pods = PodRecorder(self.kube, self.namespace).start()
        self.dispatcher = self.start_dispatcher(http_port=self.port,
                                                **{**FAULT_SETTINGS, **self.settings})
        wait_ready(self.port, timeout=60)
        self.collector = Collector(self.broker_settings).start()
        bodies = burst(self.facility, runs=self.runs, rbs=self.rbs, rb_base=9_000_000,
                       run_base=100_000, script=self.script)
        started = time.monotonic()
        self.producer = Producer(self.broker_settings, bodies).start()
        try:
            inject(self)
            self.producer.join(timeout)
            try:
                self.collector.wait(self._settled, timeout=timeout,
                                    what=f"{self.runs} runs settled")
            except AssertionError as error:
                raise AssertionError(f"{error}\n{self._unsettled()}\n"
                                     f"dispatcher log tail:\n"
                                     f"{self.dispatcher.log()[-4000:]}") from None
            self.figures.duration_s = time.monotonic() - started
            assert self.dispatcher.alive(), self.dispatcher.log()[-3000:]
            judge(figures=self.figures, collector=self.collector, kube=self.kube,
                  namespace=self.namespace, facility=self.facility, sent=bodies, pods=pods)
            self.figures.producer_resends = self.producer.resends
            self.figures.progress_s = [
                p for p in (self.collector.first_final_after(t) for t in self.cleared)
                if p is not None
            ]
        finally:
            self.collector.stop()
            pods.stop()
        record(self.figures)
        self.figures.check(dead_letters=dead_letters)
        return self.figures

    def _settled(self) -> bool:
        """Every sent run and every Job (retries are new versions) has an outcome, and
        that still holds a few seconds later (a retry is scheduled 1 s after its error)."""
        if not self._all_have_outcomes():
            return False
        time.sleep(4)
        return self._all_have_outcomes()

    def _outcome_keys(self) -> set[tuple[int, int]]:
        assert self.collector is not None
        have = set()
        for seen in self.collector.finals():
            body = seen.json()
            if isinstance(body.get("run_number"), int):
                have.add((body["run_number"], int(body.get("run_version") or 0)))
        return have

    def _unsettled(self) -> str:
        """Why the burst has not settled: runs and Jobs still without an outcome."""
        have = self._outcome_keys()
        runs = {run for run, _ in have}
        missing = sorted(100_000 + i for i in range(self.runs) if 100_000 + i not in runs)
        try:
            jobs = list_jobs(self.kube, self.namespace)
        except Exception as error:  # a diagnostic, not a verdict
            return f"runs without an outcome: {missing}; Jobs unreadable: {error}"
        open_jobs = [
            (j["metadata"]["name"], j["metadata"]["labels"].get("autoreduce.io/run-number"),
             j["metadata"]["labels"].get("autoreduce.io/run-version"),
             j["spec"].get("suspend"), j.get("status", {}))
            for j in jobs
            if (int(j["metadata"]["labels"]["autoreduce.io/run-number"]),
                int(j["metadata"]["labels"]["autoreduce.io/run-version"])) not in have
        ]
        return f"runs without an outcome: {missing}\nJobs without an outcome: {open_jobs}"

    def _all_have_outcomes(self) -> bool:
        have = self._outcome_keys()
        if len({run for run, _ in have}) < self.runs:
            return False
        try:
            jobs = list_jobs(self.kube, self.namespace)
        except Exception:  # the API may still be coming back
            return False
        return all(
            (int(j["metadata"]["labels"]["autoreduce.io/run-number"]),
             int(j["metadata"]["labels"]["autoreduce.io/run-version"])) in have
            for j in jobs
        )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``--repeat N`` runs each long scenario N times: one lucky run is no evidence."""
    if "repetition" in metafunc.fixturenames:
        count = int(metafunc.config.getoption("--repeat"))
        metafunc.parametrize("repetition", range(1, count + 1))


@pytest.fixture
def scenario(
    kube: Any, namespace: str, facility: Facility, broker_settings: BrokerSettings,
    start_dispatcher: Callable[..., DispatcherProcess], request: pytest.FixtureRequest,
) -> Iterator[Callable[..., Scenario]]:
    def make(name: str, *, runs: int, rbs: int, **kwargs: Any) -> Scenario:
        mode = "long" if request.node.get_closest_marker("slow") else "short"
        callspec = getattr(request.node, "callspec", None)
        kwargs.setdefault("repetition", callspec.params.get("repetition", 1) if callspec else 1)
        return Scenario(name=name, mode=mode, runs=runs, rbs=rbs, kube=kube,
                        namespace=namespace, facility=facility,
                        broker_settings=broker_settings, start_dispatcher=start_dispatcher,
                        **kwargs)

    yield make


# -- the dispatcher SIGKILLed at random points ---------------------------------------------


def sigkill_dispatcher(kills: int, seed: int) -> Callable[[Scenario], None]:
    def inject(s: Scenario) -> None:
        rng = random.Random(seed)
        points = sorted(rng.uniform(0.0, 0.9) for _ in range(kills))
        assert s.dispatcher is not None and s.producer is not None
        for point in points:
            # A random point of the burst: by sends early on, by outcomes later.
            while s.producer.sent < s.runs * point * 1.5 and s.progress() < s.runs * point:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.4))
            s.dispatcher.kill(signal.SIGKILL)
            s.fault()
            s.dispatcher.start()
            s.recovered()

    return inject


@pytest.mark.timeout(900)
def test_dispatcher_sigkilled_during_a_burst(scenario: Callable[..., Scenario]) -> None:
    scenario("dispatcher-sigkill", runs=50, rbs=10).run(
        sigkill_dispatcher(kills=5, seed=1), timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_dispatcher_sigkilled_during_a_burst_long(
    repetition: int, scenario: Callable[..., Scenario],
) -> None:
    scenario("dispatcher-sigkill", runs=1000, rbs=100).run(
        sigkill_dispatcher(kills=24, seed=2), timeout=2400)


# -- the broker restarted (SIGTERM and SIGKILL) and frozen ---------------------------------


def restart_broker(broker: Any, signals: list[int]) -> Callable[[Scenario], None]:
    def inject(s: Scenario) -> None:
        for index, sig in enumerate(signals):
            s.wait_progress((index + 1) / (len(signals) + 1))
            broker.restart(sig=sig)
            s.fault()
            s.recovered()

    return inject


@pytest.mark.timeout(900)
def test_broker_restarted_mid_burst(scenario: Callable[..., Scenario], broker: Any) -> None:
    scenario("broker-restart", runs=30, rbs=10).run(
        restart_broker(broker, [signal.SIGTERM, signal.SIGKILL]), timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_broker_restarted_mid_burst_long(
    repetition: int, scenario: Callable[..., Scenario], broker: Any,
) -> None:
    scenario("broker-restart", runs=300, rbs=30).run(
        restart_broker(broker, [signal.SIGTERM, signal.SIGKILL] * 3), timeout=1800)


def freeze_broker(broker: Any, seconds: float) -> Callable[[Scenario], None]:
    def inject(s: Scenario) -> None:
        s.wait_progress(0.3)
        broker.freeze()
        s.fault()
        try:
            # Heartbeats (5 s in these settings) must notice a broker that hangs.
            deadline = time.monotonic() + seconds
            noticed = False
            while time.monotonic() < deadline:
                noticed = noticed or http_status(s.port, "/readyz") == 503
                time.sleep(0.5)
        finally:
            broker.thaw()
        assert s.figures is not None
        s.figures.notes.append(f"readiness false during the freeze: {noticed}")
        s.recovered()
        assert noticed, "the dispatcher stayed Ready while the broker was frozen"

    return inject


# A freeze can swallow the RECEIPT of an outcome send. Runner and dispatcher send
# outcomes on connections without heartbeats, so the send waits out the freeze on the
# same connection instead of being resent (once seen in CI as two ReductionComplete).
@pytest.mark.timeout(900)
def test_broker_frozen_then_thawed(scenario: Callable[..., Scenario], broker: Any) -> None:
    scenario("broker-freeze", runs=30, rbs=10).run(freeze_broker(broker, 15), timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_broker_frozen_then_thawed_long(
    repetition: int, scenario: Callable[..., Scenario], broker: Any,
) -> None:
    scenario("broker-freeze", runs=200, rbs=20).run(freeze_broker(broker, 60), timeout=1200)


# -- the control plane away ----------------------------------------------------------------


def stop_control_plane(kube: Any, seconds: float) -> Callable[[Scenario], None]:
    def inject(s: Scenario) -> None:
        for fraction, stop, start in ((0.25, kube.stop_apiserver, kube.start_apiserver),
                                      (0.6, kube.stop_etcd, kube.start_etcd)):
            s.wait_progress(fraction)
            stop()
            s.fault()
            deadline = time.monotonic() + seconds
            noticed = False
            assert s.dispatcher is not None
            while time.monotonic() < deadline:
                noticed = noticed or http_status(s.port, "/readyz") == 503
                assert s.dispatcher.alive(), "the dispatcher died while the API was away"
                time.sleep(0.5)
            start()
            assert s.figures is not None
            s.figures.notes.append(f"{stop.__name__}: readiness false during it: {noticed}")
            s.recovered()
            assert noticed, f"the dispatcher stayed Ready during {stop.__name__}"

    return inject


@pytest.mark.timeout(900)
def test_apiserver_and_etcd_stopped_mid_burst(
    scenario: Callable[..., Scenario], kube: Any,
) -> None:
    scenario("control-plane-stop", runs=30, rbs=10).run(stop_control_plane(kube, 10),
                                                         timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_apiserver_and_etcd_stopped_mid_burst_long(
    repetition: int, scenario: Callable[..., Scenario], kube: Any,
) -> None:
    scenario("control-plane-stop", runs=300, rbs=30).run(stop_control_plane(kube, 30),
                                                          timeout=1800)


# -- runner pods killed --------------------------------------------------------------------


def kill_runner_pods(kube: Any, namespace: str, kills: int, seed: int
                     ) -> Callable[[Scenario], None]:
    def kill_process(pod: Any) -> bool:
        try:
            kill_container(kube, pod)  # every process of the container, at once
        except (AssertionError, RuntimeError):
            return False  # it stopped (or never started) in the meantime
        return True

    def inject(s: Scenario) -> None:
        rng = random.Random(seed)
        done = 0
        with kube.api_client() as api:
            core = k8s.CoreV1Api(api)
            deadline = time.monotonic() + 240
            while done < kills and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.2, 1.0))
                pods = [p for p in core.list_namespaced_pod(
                    namespace, label_selector="autoreduce.io/managed=true").items
                    if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
                if not pods:
                    continue
                pod = rng.choice(pods)
                if done % 2 == 0:
                    core.delete_namespaced_pod(pod.metadata.name, namespace)
                elif not kill_process(pod):
                    continue
                done += 1
                s.fault()
        assert done >= kills, f"only {done} runner pods killed"

    return inject


@pytest.mark.timeout(900)
def test_runner_pods_killed_at_random(
    scenario: Callable[..., Scenario], kube: Any, namespace: str,
) -> None:
    scenario("runner-pod-kill", runs=30, rbs=10, script=timeline_script(1.5, ignore_term=True)).run(
        kill_runner_pods(kube, namespace, kills=6, seed=3), timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_runner_pods_killed_at_random_long(
    repetition: int, scenario: Callable[..., Scenario], kube: Any, namespace: str,
) -> None:
    # Runs long enough (15 per RB, 4 s each) that 40 kills land while pods run.
    scenario("runner-pod-kill", runs=300, rbs=20, script=timeline_script(4, ignore_term=True)).run(
        kill_runner_pods(kube, namespace, kills=40, seed=4), timeout=1800)


"""The six scenarios. Each returns a plain dict of figures (seconds unless named)."""

from __future__ import annotations

import itertools
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from autoreduce_common.messages import parse_run

from bench.cycle import cycle
from bench.env import Scenario, Stack, cpu_seconds, job_of, rss_mb, run_body
from bench.machine import load
from bench.startup import startup
from bench.stats import summary
from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels, job_name, run_key
from dispatcher.leases import RbLeases
from dispatcher.manifests import (
    Arrival,
    inline_message,
    load_template,
    owned_by,
    render_config_map,
    render_job,
)

# Requests the dispatcher makes (the Job controller writes jobs/status, pods and
# core/v1 events; the kubelet pods/status and its node Lease every 10 s).
DISPATCHER_WRITES = (
    "POST batch/jobs", "POST configmaps", "PATCH batch/jobs", "POST coordination.k8s.io/leases",
    "PUT coordination.k8s.io/leases", "DELETE coordination.k8s.io/leases",
    "POST events.k8s.io/events",
)  # fmt: skip
EVENTS_POST = "POST events.k8s.io/events"
EVENT_REPORTER = "autoreduce.io/dispatcher"  # dispatcher/kube.py's reportingController
DISPATCHER_READS = (
    "GET coordination.k8s.io/leases", "GET batch/jobs", "LIST pods", "GET configmaps",
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    limit_sequential: int
    limit_concurrent: int
    limit_admit: int
    rates: tuple[tuple[float, float], ...]  # (runs/s, seconds)
    burst_runs: int
    burst_rbs: int
    handoff_rbs: int
    handoff_runs_per_rb: int
    scale_rbs: int
    scale_runs_per_rb: int
    idle_s: float = 15.0  # how long the scale scenario measures the idle dispatcher's CPU
    poster_runs: int = 20  # runs per mode in the poster-sidecar and start-up scenarios
    cycle_scale: int = 1  # the busy cycle's waves times this (0: the tiny smoke cycle)
    cycle_max_nodes: int = 3  # the busy cycle's node pool grows up to this


PRESETS = {
    "tiny": Sizes(10, 20, 5, ((5, 2),), 20, 5, 2, 3, 5, 3, idle_s=3.0, poster_runs=1,
                  cycle_scale=0, cycle_max_nodes=2),
    "quick": Sizes(100, 200, 30, ((5, 6), (20, 5)), 200, 50, 5, 5, 100, 10, poster_runs=4),
    # full: the scale is a whole cycle rerun (issue 18): 50,000 runs over 5,000 RBs.
    "full": Sizes(300, 600, 100, ((5, 20), (20, 20), (50, 20), (100, 20)), 2000, 500, 20, 10,
                  5000, 10),
}

_run_numbers = itertools.count(1)
_rb_numbers = itertools.count(1_000_001)


def _runs(count: int) -> Iterator[int]:
    return (next(_run_numbers) for _ in range(count))


def wait_ready(scenario: Scenario, timeout: float = 120) -> float:
    """Seconds until the dispatcher logs that it consumes (its view is built)."""
    assert scenario.dispatcher is not None
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if "consuming" in scenario.dispatcher.log():
            return time.monotonic() - started
        if not scenario.dispatcher.alive():
            raise RuntimeError(f"dispatcher exited:\n{scenario.dispatcher.log()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError("dispatcher did not start consuming")


def _api_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] - before[k] > 0}


def _per_run(delta: dict[str, int], runs: int, *, reporters: Counter[str],
             lease_puts: int | None = None) -> dict[str, Any]:
    # The scheduler's Events and the Job controller's use the same APIs as ours, so
    # ours are counted by their reporter in the scenario's namespace (subtracting the
    # others from the apiserver's counter counted the scheduler's Events for pods of
    # the previous scenario's Jobs as ours). The kubelets renew their node Leases
    # (PUT): ``lease_puts`` is the dispatcher's own count when the scenario knows it
    # (its Leases' leaseTransitions), else the heuristic below.
    node_leases = min(delta.get("PUT coordination.k8s.io/leases", 0),
                      delta.get("PATCH nodes/status", 0))  # fmt: skip
    if lease_puts is not None:
        node_leases = delta.get("PUT coordination.k8s.io/leases", 0) - lease_puts
    events = min(reporters.get(EVENT_REPORTER, 0), delta.get(EVENTS_POST, 0))
    writes = sum(delta.get(k, 0) for k in DISPATCHER_WRITES if k != EVENTS_POST) + events
    writes -= node_leases
    reads = sum(delta.get(k, 0) for k in DISPATCHER_READS)
    return {
        "dispatcher_writes_per_run": writes / runs if runs else None,
        "dispatcher_writes_excluding_events_per_run": (writes - events) / runs if runs else None,
        "dispatcher_reads_per_run": reads / runs if runs else None,
        "all_requests_per_run": sum(delta.values()) / runs if runs else None,
        "events_by_reporter": dict(reporters),
        "by_request": {k: round(v / runs, 3) for k, v in delta.items()} if runs else {},
    }


def _lease_transitions(stack: Stack, namespace: str) -> int:
    """The dispatcher's Lease replaces in ``namespace`` (each adds a transition);
    right only while none of its Leases was deleted, as in the dispatch scenario."""
    leases = stack.kube_client(namespace).list_leases(selector="")
    return sum(int((lease.get("spec") or {}).get("leaseTransitions") or 0) for lease in leases)


def _settled(stack: Stack, *, quiet_s: float = 3.0, timeout: float = 300) -> Counter[str]:
    """Wait until the dispatcher's API traffic stops (queued Events, Lease writes)."""
    deadline = time.monotonic() + timeout
    last = stack.request_totals()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = stack.request_totals()
        if all(now[k] == last[k] for k in DISPATCHER_WRITES + DISPATCHER_READS[:1]):
            return now
        last = now
    return last


# -- 1. the limit ---------------------------------------------------------------------------


def limit(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    """The same client and objects as the dispatcher, no broker, no budget."""
    scenario = Scenario(stack, "limit")
    settings = DispatcherSettings.model_validate(scenario.settings(runs_pods=False))
    template = load_template(settings.jobs.template_path)
    kube = stack.kube_client(scenario.namespace)
    labels = Labels(settings.jobs.label_prefix)
    leases = RbLeases(kube=kube, labels=labels, identity="bench-limit")
    render_times: list[float] = []

    def prepare(count: int, *, inline: bool = False
                ) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        items = []
        for run in _runs(count):
            rb = next(_rb_numbers)
            raw, message = parse_run(run_body(instrument="LIMIT", rb=rb, run=run))
            key = run_key(message)
            started = time.perf_counter()
            job = render_job(settings=settings, template=template, key=key,
                             arrival=Arrival(priority=4, enqueued_ms=int(time.time() * 1000),
                                             message_id=f"bench-{run}"),
                             message=inline_message(settings, raw) if inline else None)
            config_map = render_config_map(settings=settings, key=key, raw=raw)
            render_times.append(time.perf_counter() - started)
            items.append((str(rb), job_name(key), job, config_map))
        return items

    def create(item: tuple[str, str, dict[str, Any], dict[str, Any]], *, admit: bool) -> float:
        rb, name, job_body, config_map = item
        started = time.monotonic()
        job = kube.create_job(job_body)
        kube.create_config_map(owned_by(config_map, job_uid=job["metadata"]["uid"], job=name))
        if admit:
            leases.grant(rb=rb, job=name, base=None)
            kube.set_suspend(name, suspend=False)
        return time.monotonic() - started

    sequential = prepare(sizes.limit_sequential)
    load_before = load()
    started = time.monotonic()
    seq_latency = [create(item, admit=False) for item in sequential]
    seq_wall = time.monotonic() - started

    concurrent = prepare(sizes.limit_concurrent)
    conc_latency, conc_wall = _concurrently(
        concurrent, lambda item: create(item, admit=False), threads=settings.concurrency
    )
    admitted = prepare(sizes.limit_admit)
    admit_latency = [create(item, admit=True) for item in admitted]

    def create_direct(item: tuple[str, str, dict[str, Any], dict[str, Any]]) -> float:
        """The writes of the dispatcher's direct path: Lease, then the Job created
        running with its message (its pod is made by the Job controller)."""
        rb, name, job_body, _ = item
        started = time.monotonic()
        leases.grant(rb=rb, job=name, base=None, direct=True)
        kube.create_job({**job_body, "spec": {**job_body["spec"], "suspend": False}})
        return time.monotonic() - started

    direct = prepare(sizes.limit_admit, inline=True)
    started = time.monotonic()
    direct_latency = [create_direct(item) for item in direct]
    direct_wall = time.monotonic() - started
    return {
        "what": "create Job then its owned ConfigMap with dispatcher.kube.Kube (no client-side "
        "budget), manifests pre-rendered by dispatcher.manifests",
        "render_ms_mean": 1000 * sum(render_times) / len(render_times),
        "sequential": {**summary(seq_latency), "runs_per_s": len(seq_latency) / seq_wall},
        "concurrent": {**summary(conc_latency), "threads": settings.concurrency,
                       "runs_per_s": len(conc_latency) / conc_wall},
        "sequential_with_admission": {
            **summary(admit_latency),
            "what": "plus Lease create and the unsuspend patch (4 calls: an admitted run)",
        },
        "sequential_direct": {
            **summary(direct_latency), "runs_per_s": len(direct_latency) / direct_wall,
            "what": "Lease create, then the Job created running with its message inline "
            "(the dispatcher's writes for a free RB); its pod follows from the Job controller",
        },
        "load": [load_before, load()],
    }


def _concurrently(
    items: list[Any], work: Callable[[Any], float], *, threads: int
) -> tuple[list[float], float]:
    results: list[float] = []
    lock = threading.Lock()
    feed = iter(items)

    def worker() -> None:
        while True:
            with lock:
                item = next(feed, None)
            if item is None:
                return
            latency = work(item)
            with lock:
                results.append(latency)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.monotonic()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return results, time.monotonic() - started


# -- 2. dispatch latency at steady rates ------------------------------------------------------


def dispatch(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    scenario = Scenario(stack, "dispatch")
    try:
        scenario.start_dispatcher(scenario.settings(runs_pods=False))
        wait_ready(scenario)
        scenario.start_watch()
        before = stack.request_totals()
        total = 0
        rates = []
        # The dispatcher's wall-clock profile is taken at 20 runs/s (the target's rate),
        # or at the highest rate of a smaller preset.
        profiled = 20 if any(rate == 20 for rate, _ in sizes.rates) else sizes.rates[-1][0]
        for rate, seconds in sizes.rates:
            count = max(int(rate * seconds), 1)
            total += count
            if rate == profiled:
                scenario.profile_start()
            rates.append(_steady(scenario, rate=rate, count=count))
            if rate == profiled:
                rates[-1]["profile"] = scenario.profile_stop()
            time.sleep(1)
        delta = _api_delta(before, _settled(stack))
        return {
            "what": "STOMP send -> Job ADDED / unsuspended event seen by the bench's watch; "
            "every run on its own RB (free: admitted at once)",
            "rates": rates,
            "api": _per_run(delta, total, reporters=scenario.events_by_reporter(),
                            lease_puts=_lease_transitions(stack, scenario.namespace)),
            "api_delta": delta,
        }
    finally:
        scenario.stop()


def _steady(scenario: Scenario, *, rate: float, count: int) -> dict[str, Any]:
    assert scenario.watcher is not None and scenario.broker is not None
    bodies = [run_body(instrument="WISH", rb=next(_rb_numbers), run=run) for run in _runs(count)]
    names = [job_of(body) for body in bodies]
    sent: dict[str, float] = {}
    client = scenario.sender()
    load_before = load()
    started = time.monotonic()
    try:
        for index, (name, body) in enumerate(zip(names, bodies, strict=True)):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[name] = time.monotonic()
            client.send(destination=scenario.broker.queues.pending, body=body, priority=4)
    finally:
        client.disconnect()
    watcher = scenario.watcher
    done = watcher.wait(lambda w: all(n in w.unsuspended for n in names),
                        timeout=60 + count * 0.5)  # fmt: skip
    exists = [watcher.added[n] - sent[n] for n in names if n in watcher.added]
    admitted = [watcher.unsuspended[n] - sent[n] for n in names if n in watcher.unsuspended]
    last_exists = max((watcher.added[n] for n in names if n in watcher.added), default=started)
    last_admitted = max(
        (watcher.unsuspended[n] for n in names if n in watcher.unsuspended), default=started
    )
    return {
        "offered_per_s": rate,
        "runs": count,
        "all_admitted": done,
        "exists": summary(exists),
        "admitted": summary(admitted),
        "achieved_exists_per_s": len(exists) / max(last_exists - started, 1e-9),
        "achieved_admitted_per_s": len(admitted) / max(last_admitted - started, 1e-9),
        "load": [load_before, load()],
    }


# -- 3. burst ----------------------------------------------------------------------------------


def burst(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    scenario = Scenario(stack, "burst")
    try:
        scenario.start_dispatcher(scenario.settings(runs_pods=False))
        wait_ready(scenario)
        watcher = scenario.start_watch()
        rbs = [next(_rb_numbers) for _ in range(sizes.burst_rbs)]
        bodies = [run_body(instrument="WISH", rb=rbs[i % len(rbs)], run=run)
                  for i, run in enumerate(_runs(sizes.burst_runs))]  # fmt: skip
        names = [job_of(body) for body in bodies]
        load_before = load()
        started = time.monotonic()
        send_s = scenario.send_all(bodies)
        all_jobs = watcher.wait(lambda w: all(n in w.added for n in names),
                                timeout=120 + len(names))  # fmt: skip
        jobs_s = max(watcher.added.get(n, started) for n in names) - started
        drained_s = None
        while time.monotonic() - started < 120 + len(names):
            if scenario.queue_depth() == 0:
                drained_s = time.monotonic() - started
                break
            time.sleep(0.2)
        admitted = watcher.wait(lambda w: w.count(w.unsuspended, names) >= len(rbs), timeout=120)
        admitted_s = max((watcher.unsuspended[n] for n in names if n in watcher.unsuspended),
                         default=started) - started  # fmt: skip
        accepted_s = max(jobs_s, drained_s or 0.0)
        return {
            "what": f"{len(names)} runs over {len(rbs)} RBs sent at once (4 STOMP senders)",
            "runs": len(names),
            "rbs": len(rbs),
            "send_s": send_s,
            "all_jobs_exist": all_jobs,
            "all_jobs_exist_s": jobs_s,
            "queue_drained_s": drained_s,
            "accepted_s": accepted_s,
            "accepted_per_s": len(names) / accepted_s if accepted_s else None,
            "first_runs_admitted": admitted,
            "first_runs_admitted_s": admitted_s,
            "load": [load_before, load()],
        }
    finally:
        scenario.stop()


# -- 4. hand-off ---------------------------------------------------------------------------------


def handoff(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    scenario = Scenario(stack, "handoff")
    gate = scenario.workdir / "gate"
    try:
        settings = scenario.settings(runs_pods=True)
        # Pods wait for the gate until every run is queued and the dispatcher is idle,
        # so hand-offs are measured at steady state, not while the burst of arrivals
        # spends the API budget; once open, every pod exits at once.
        settings["runner"]["env"] = {"BENCH_GATE": str(gate)}
        scenario.start_dispatcher(settings)
        wait_ready(scenario)
        watcher = scenario.start_watch()
        rbs = [next(_rb_numbers) for _ in range(sizes.handoff_rbs)]
        bodies = [run_body(instrument="LET", rb=rb, run=next(_run_numbers))
                  for _ in range(sizes.handoff_runs_per_rb) for rb in rbs]  # fmt: skip
        names = [job_of(body) for body in bodies]
        load_before = load()
        scenario.send_all(bodies, threads=1)  # in order: each RB's runs queue up in order
        watcher.wait(lambda w: all(n in w.added for n in names)
                     and w.count(w.unsuspended, names) >= len(rbs), timeout=120 + len(names))
        _settled(stack)
        gate.touch()
        finished = watcher.wait(lambda w: all(n in w.finished for n in names),
                                timeout=120 + 3 * len(names))  # fmt: skip
        from_finished, from_complete = _handoffs(watcher, names)
        return {
            "what": f"{len(rbs)} RBs x {sizes.handoff_runs_per_rb} runs queued, then pods released "
            "(the runner image running `sh -c`, exit 0, on the real node); previous Job's "
            "terminal condition event -> next Job's unsuspend event",
            "all_finished": finished,
            "from_terminal_condition": summary(from_finished),
            "from_complete_condition": summary(from_complete),
            "legacy_poll_10s_model": {"p50": 5.0, "p99": 9.9},
            "autoscaler_poll_30s_model": {"p50": 15.0, "p99": 29.7},
            "load": [load_before, load()],
        }
    finally:
        scenario.stop()


def _handoffs(watcher: Any, names: list[str]) -> tuple[list[float], list[float]]:
    by_rb: dict[str, list[str]] = {}
    for name in names:
        if name in watcher.unsuspended:
            by_rb.setdefault(watcher.rb[name], []).append(name)
    from_finished: list[float] = []
    from_complete: list[float] = []
    for jobs in by_rb.values():
        jobs.sort(key=lambda n: watcher.unsuspended[n])
        for before, after in itertools.pairwise(jobs):
            if before in watcher.finished:
                from_finished.append(watcher.unsuspended[after] - watcher.finished[before])
            if before in watcher.complete:
                from_complete.append(watcher.unsuspended[after] - watcher.complete[before])
    return from_finished, from_complete


# -- 5. scale --------------------------------------------------------------------------------------


def scale(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    scenario = Scenario(stack, "scale")
    gate = scenario.workdir / "gate"
    try:
        settings = scenario.settings(
            runs_pods=False,
            # One RB's runner pods do run: they wait for the gate file, so the bench
            # can finish that RB's running Job when it wants to.
            instruments={"BENCHPROBE": {"node_selector": {}, "env": {"BENCH_GATE": str(gate)}}},
        )
        scenario.start_dispatcher(settings)
        wait_ready(scenario)
        watcher = scenario.start_watch()
        assert scenario.dispatcher is not None and scenario.dispatcher.process is not None
        pid = scenario.dispatcher.process.pid
        rbs = [next(_rb_numbers) for _ in range(sizes.scale_rbs)]
        probe_rb = rbs[0]
        bodies: list[bytes] = []
        probe: list[str] = []
        for _ in range(sizes.scale_runs_per_rb):
            for rb in rbs:
                instrument = "BENCHPROBE" if rb == probe_rb else "WISH"
                bodies.append(run_body(instrument=instrument, rb=rb, run=next(_run_numbers)))
                if rb == probe_rb:
                    probe.append(job_of(bodies[-1]))
        names = [job_of(body) for body in bodies]
        before = stack.request_totals()
        etcd_before = stack.etcd_db_mb()
        cpu_before = cpu_seconds(pid)
        load_before = load()
        started = time.monotonic()
        send_s = scenario.send_all(bodies)
        filled = watcher.wait(
            lambda w: all(n in w.added for n in names)
            and w.count(w.unsuspended, names) >= len(rbs),
            timeout=300 + len(names),
        )
        fill_s = time.monotonic() - started
        after = _settled(stack)
        settled_s = time.monotonic() - started
        cpu_fill = cpu_seconds(pid) - cpu_before
        memory = rss_mb(pid)
        etcd_after = stack.etcd_db_mb()
        idle_started, idle_cpu0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(sizes.idle_s)
        idle_cpu = (cpu_seconds(pid) - idle_cpu0) / (time.monotonic() - idle_started)
        restart = _restart(scenario, settings, probe=probe, gate=gate)
        delta = _api_delta(before, after)
        return {
            "what": f"{len(names)} runs over {len(rbs)} RBs: one running (pod Pending) and "
            f"{sizes.scale_runs_per_rb - 1} waiting per RB",
            "runs": len(names),
            "rbs": len(rbs),
            "waiting": len(names) - len(rbs),
            "send_s": send_s,
            "filled": filled,
            "fill_s": fill_s,
            "fill_runs_per_s": len(names) / fill_s,
            "settled_s": settled_s,
            "rss_mb": memory.get("VmRSS"),
            "peak_rss_mb": memory.get("VmHWM"),
            "cpu_s_per_run": cpu_fill / len(names),
            "etcd_db_mb": [etcd_before, etcd_after],
            "idle_cpu_percent": 100 * idle_cpu,
            "api": _per_run(delta, len(names), reporters=scenario.events_by_reporter()),
            "api_delta": delta,
            "restart": restart,
            "load": [load_before, load()],
        }
    finally:
        scenario.stop()


def _restart(
    scenario: Scenario, settings: dict[str, Any], *, probe: list[str], gate: Any
) -> dict[str, Any]:
    """SIGKILL the dispatcher, start a new one, finish the probe RB's running Job."""
    watcher = scenario.watcher
    assert watcher is not None and scenario.dispatcher is not None
    holders = [n for n in probe if n in watcher.unsuspended]
    scenario.dispatcher.kill(signal.SIGKILL)
    started = time.monotonic()
    scenario.start_dispatcher(settings, name="dispatcher-restarted")
    ready: list[float] = []
    waiter = threading.Thread(target=lambda: ready.append(wait_ready(scenario)), daemon=True)
    waiter.start()
    gate.touch()  # the holder's pod exits 0: its Job completes
    # A new run on a free RB: admitted as soon as the new dispatcher is back (direct
    # admission), whatever the Job controller's lag (the probe below waits for it to
    # mark the holder's Job Complete, which at 50,000 runs can take many minutes).
    fresh = job_of(scenario.send_one(run_body(instrument="WISH", rb=next(_rb_numbers),
                                              run=next(_run_numbers))))  # fmt: skip
    fresh_admitted = watcher.wait(lambda w: fresh in w.unsuspended, timeout=300)
    admitted = watcher.wait(
        lambda w: w.count(w.unsuspended, probe) > len(holders), timeout=300
    )
    nxt = [n for n in probe if n in watcher.unsuspended and n not in holders]
    admitted_at = min((watcher.unsuspended[n] for n in nxt), default=None)
    finished_at = min((watcher.finished[n] for n in holders if n in watcher.finished),
                      default=None)  # fmt: skip
    waiter.join(120)
    assert scenario.dispatcher.process is not None
    time.sleep(2)
    return {
        "new_run_admitted_after_s": (
            watcher.unsuspended[fresh] - started if fresh_admitted else None
        ),
        "next_admitted": admitted,
        "restart_to_next_admission_s": admitted_at - started if admitted_at else None,
        "holder_finished_after_s": finished_at - started if finished_at else None,
        "consuming_after_s": ready[0] if ready else None,
        # The dispatcher's own figure: its first Job list, read while it consumed.
        "job_list_s": _job_list_s(scenario.dispatcher.log()),
        "rss_mb_after_restart": rss_mb(scenario.dispatcher.process.pid).get("VmRSS"),
    }


def _job_list_s(log: str) -> float | None:
    found = re.search(r"Job cache in: \d+ Jobs listed in ([\d.]+)s", log)
    return float(found.group(1)) if found else None


# -- 6. the poster sidecar's cost ----------------------------------------------------------------

POSTER_SCRIPT = "def main(input_file, output_dir):\n    pass\n"


def poster(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    """What the poster sidecar (the broker credential out of reduce.py's reach) costs
    a run: the real runner, a script that does nothing, one run at a time on an idle
    node, with the sidecar and without it (``jobs.poster_sidecar``)."""
    modes = {}
    for sidecar in (False, True):
        modes["sidecar" if sidecar else "direct"] = _poster_runs(
            stack, sidecar=sidecar, runs=sizes.poster_runs)
    direct, side = modes["direct"], modes["sidecar"]
    return {
        "what": f"{sizes.poster_runs} runs per mode, one at a time: run message sent -> "
        "ReductionStarted received (pod created, containers started, the runner connected) "
        "and -> ReductionComplete received",
        **modes,
        "started_p50_extra_s": _minus(_get_p50(side, "to_started"), _get_p50(direct, "to_started")),
        "complete_p50_extra_s": _minus(_get_p50(side, "to_complete"),
                                       _get_p50(direct, "to_complete")),
    }


def _get_p50(mode: dict[str, Any], key: str) -> float | None:
    value = (mode.get(key) or {}).get("p50")
    return None if value is None else float(value)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _poster_runs(stack: Stack, *, sidecar: bool, runs: int) -> dict[str, Any]:
    scenario = Scenario(stack, "poster-sidecar" if sidecar else "poster-direct")
    try:
        settings = scenario.real_runner_settings()
        settings["jobs"]["poster_sidecar"] = sidecar
        scenario.start_dispatcher(settings)
        wait_ready(scenario)
        reader = scenario.outcome_reader()
        to_started, to_complete = [], []
        load_before = load()
        # One run first, not counted: the node unpacks the runner image for its first
        # container (the stack imports images unpacked lazily, as a pull would leave
        # them), which took 3-13 s here and would land on whichever side ran first.
        for index in range(runs + 1):
            run = next(_run_numbers)
            body = run_body(instrument="LET", rb=next(_rb_numbers), run=run,
                            script=POSTER_SCRIPT, data=scenario.data_file("LET", run))
            sent = time.monotonic()
            scenario.send_all([body], threads=1)
            started = reader.wait_for_run(scenario.broker_queue("started"), run, timeout=120)
            done = reader.wait_for_run(scenario.broker_queue("complete"), run, timeout=120)
            if index:
                to_started.append(started - sent)
                to_complete.append(done - sent)
        reader.close()
        return {"to_started": summary(to_started), "to_complete": summary(to_complete),
                # In order: an outlier's place says whether it is the first pod on the node.
                "to_started_s": [round(s, 3) for s in to_started],
                "load": [load_before, load()]}
    finally:
        scenario.stop()


def busy_cycle(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    """A cycle's arrival pattern against a node pool that grows when pods pend
    (``bench/cycle.py``; drawn to ``busy-cycle.png`` beside the results)."""
    return cycle(stack, scale=sizes.cycle_scale, max_nodes=sizes.cycle_max_nodes)


def start_to_started(stack: Stack, sizes: Sizes) -> dict[str, Any]:
    """Message -> ReductionStarted beside the raw Job -> pod Running (bench/startup.py)."""
    return startup(stack, runs=sizes.poster_runs, next_run=lambda: next(_run_numbers),
                   next_rb=lambda: next(_rb_numbers),
                   product=_poster_runs(stack, sidecar=True, runs=sizes.poster_runs))


SCENARIOS: dict[str, Callable[[Stack, Sizes], dict[str, Any]]] = {
    "limit": limit,
    "dispatch": dispatch,
    "burst": burst,
    "handoff": handoff,
    "scale": scale,
    "poster": poster,
    "startup": start_to_started,
    "cycle": busy_cycle,
}

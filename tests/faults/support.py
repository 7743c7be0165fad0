"""What the fault suite shares: a burst sender, an outcome collector that survives
broker faults, and the judge that turns the broker's and the API's own records into
figures (lost, duplicated, exclusivity violations, drained queues, recovery times)."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.pod_contract import OUTCOME_ID_HEADER, POSSIBLE_REPEAT_HEADER
from autoreduce_common.stomp_client import BrokerError, Delivery, StompClient
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from devstack.product import Facility, read_timeline, run_message
from tests.harness.checks import (
    container_span,
    end_unrecorded,
    exclusivity_violations,
    http_status,
)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
SELECTOR = "autoreduce.io/managed=true"
# The harness's timeline script plus an attempt id: a retried run (same file, new
# version) is a separate span, and a killed attempt leaves a start without an end.
# (Not the pid: every pod has its own PID namespace, so pids repeat.)
# It notes a tick every 0.2 s while it sleeps, so a killed attempt's span ends at its
# last tick rather than at its start; IGNORE_TERM makes it shrug off SIGTERM (the runner
# then SIGKILLs it after kill_grace_s), which is when a too-early hand-off shows.
TIMELINE_SCRIPT = """
import json, os, signal, time, uuid
SLEEP = {sleep}
IGNORE_TERM = {ignore_term}
def note(event, input_file, attempt):
    with open("/instrument/timeline.jsonl", "a") as f:
        f.write(json.dumps({{"event": event, "file": input_file, "t": time.time(),
                            "pid": attempt}}) + "\\n")
def main(input_file, output_dir):
    attempt = uuid.uuid4().hex
    if IGNORE_TERM:
        signal.signal(signal.SIGTERM, lambda *_: note("sigterm", input_file, attempt))
    note("start", input_file, attempt)
    deadline = time.time() + SLEEP
    while time.time() < deadline:
        time.sleep(min(0.2, max(deadline - time.time(), 0)))
        note("tick", input_file, attempt)
    with open(os.path.join(output_dir, "reduced.txt"), "w") as out:
        out.write("reduced " + input_file)
    note("end", input_file, attempt)
"""


def timeline_script(sleep: float, *, ignore_term: bool = False) -> str:
    return TIMELINE_SCRIPT.format(sleep=sleep, ignore_term=ignore_term)


FAST_SCRIPT = timeline_script(0.02)


def wait_ready(port: int, *, timeout: float) -> float:
    """Seconds until /readyz answers 200 (AssertionError after ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_status(port, "/readyz") == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"dispatcher not ready within {timeout}s")


# -- the broker side -------------------------------------------------------------------


@dataclass
class Seen:
    at: float  # monotonic
    destination: str
    message_id: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> dict[str, Any]:
        loaded = json.loads(self.body)
        return loaded if isinstance(loaded, dict) else {}


class Collector:
    """Reads every outcome queue and the dead-letter queue on its own thread, acking
    each, reconnecting through broker faults; broker redeliveries (same message-id)
    are counted once, so only a second *send* shows up as a duplicate."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.client = StompClient(settings=settings, client_name="fault-collector")
        self.sink: queue.Queue[Delivery] = queue.Queue()
        self.seen: list[Seen] = []
        self._ids: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="collector")

    def start(self) -> Collector:
        self.client.connect()
        q = self.settings.queues
        for destination in (q.started, q.complete, q.error, q.skipped, q.dead_letter):
            self.client.subscribe(destination=destination, sink=self.sink, prefetch=500)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.client.connected:
                self.client.ensure_connected(stop=self._stop)
            try:
                delivery = self.sink.get(timeout=0.3)
            except queue.Empty:
                continue
            self.client.ack(delivery)
            key = (delivery.destination, str(delivery.headers.get("message-id", "")))
            with self._lock:
                if key in self._ids:
                    continue
                self._ids.add(key)
                self.seen.append(Seen(time.monotonic(), delivery.destination, key[1],
                                      delivery.body, dict(delivery.headers)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.disconnect()

    def on(self, *kinds: str) -> list[Seen]:
        destinations = {getattr(self.settings.queues, kind) for kind in kinds}
        with self._lock:
            return [s for s in self.seen if s.destination in destinations]

    def finals(self) -> list[Seen]:
        return self.on("complete", "error", "skipped")

    def first_final_after(self, moment: float) -> float | None:
        times = [s.at for s in self.finals() if s.at >= moment]
        return min(times) - moment if times else None

    def wait(self, predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.25)


def browse_count(settings: BrokerSettings, destination: str, *,
                 match: Callable[[Delivery], bool] | None = None) -> int:
    """Messages still in ``destination`` (delivered-but-unacked ones included)."""
    client = StompClient(settings=settings, client_name="fault-browser")
    client.connect()
    sink: queue.Queue[Delivery] = queue.Queue()
    try:
        client.subscribe(destination=destination, sink=sink, prefetch=1000,
                         headers={"browser": "true"})
        count = 0
        while True:
            delivery = sink.get(timeout=30)
            if delivery.headers.get("browser") == "end":
                return count
            if match is None or match(delivery):
                count += 1
    finally:
        client.disconnect()


class Producer:
    """Sends a burst on its own thread, resending whatever the broker did not confirm
    (a resend after a lost receipt is a duplicate the dispatcher must absorb)."""

    def __init__(self, settings: BrokerSettings, bodies: list[dict[str, Any]], *,
                 pace_s: float = 0.0) -> None:
        self.settings = settings
        self.bodies = bodies
        self.pace_s = pace_s
        self.client = StompClient(settings=settings, client_name="fault-producer")
        self.sent = 0
        self.resends = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="producer")

    def start(self) -> Producer:
        self.client.connect()
        self._thread.start()
        return self

    def _run(self) -> None:
        for body in self.bodies:
            while True:
                try:
                    if not self.client.connected:
                        self.client.ensure_connected()
                    self.client.send(destination=self.settings.queues.pending,
                                     body=json.dumps(body).encode(), priority=4)
                    break
                except BrokerError:
                    self.resends += 1
                    time.sleep(0.2)
            self.sent += 1
            if self.pace_s:
                time.sleep(self.pace_s)
        self.done.set()

    def join(self, timeout: float) -> None:
        assert self.done.wait(timeout), f"producer stuck after {self.sent} sends"
        self.client.disconnect()


def burst(facility: Facility, *, runs: int, rbs: int, rb_base: int, run_base: int,
          script: str = FAST_SCRIPT) -> list[dict[str, Any]]:
    instruments = ["WISH", "LET", "MARI", "OSIRIS", "POLARIS"]
    return [
        run_message(facility=facility, instrument=instruments[(i % rbs) % len(instruments)],
                    rb=rb_base + i % rbs, run=run_base + i, script=script)
        for i in range(runs)
    ]


# -- the judge -------------------------------------------------------------------------


class PodRecorder:
    """Watches the runs' pods and keeps each runner container's last known span."""

    def __init__(self, kube: Any, namespace: str) -> None:
        self._kube = kube
        self._namespace = namespace
        self._spans: dict[str, tuple[str, tuple[float, float]]] = {}
        self.unrecorded: set[str] = set()  # pods whose container's end the kubelet lost
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pod-recorder")

    def start(self) -> PodRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._kube.api_client() as api:
                    core = k8s.CoreV1Api(api)
                    for event in k8s_watch.Watch().stream(
                            core.list_namespaced_pod, self._namespace, label_selector=SELECTOR,
                            timeout_seconds=5, _preload_content=False):
                        self._note(event["raw_object"])
            except Exception:  # the API may be away (a control-plane fault): retry
                self._stop.wait(0.5)

    def _note(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if end_unrecorded(pod):
            # Only the script's own timeline and the Job's hold can judge this run.
            with self._lock:
                self._spans.pop(uid, None)
                self.unrecorded.add(uid)
            return
        span = container_span(pod)
        if span is None:
            return
        rb = (pod["metadata"].get("labels") or {}).get("autoreduce.io/rb-number", "?")
        with self._lock:
            self._spans[uid] = (rb, span)

    def spans_by_rb(self) -> dict[str, list[tuple[float, float]]]:
        by_rb: dict[str, list[tuple[float, float]]] = defaultdict(list)
        with self._lock:
            for rb, span in self._spans.values():
                by_rb[rb].append(span)
        return by_rb


def list_jobs(kube: Any, namespace: str) -> list[dict[str, Any]]:
    with kube.api_client() as api:
        raw = k8s.BatchV1Api(api).list_namespaced_job(
            namespace, label_selector=SELECTOR, _preload_content=False)
        return list(json.loads(raw.data)["items"])


@dataclass
class Figures:
    scenario: str
    mode: str
    runs: int
    rbs: int
    faults: int
    outcomes: int = 0
    lost: int = 0
    duplicated: int = 0  # copies beyond the first: repeats + contradictory
    repeats: int = 0  # later copies of the same kind (same identity): allowed, counted
    contradictory: int = 0  # runs that got two different outcome kinds: never allowed
    unmarked_repeats: int = 0  # repeats without the possible-repeat header
    identity_mismatches: int = 0  # copies of one run's outcome with different ids
    jobs: int = 0
    duplicate_jobs: int = 0
    exclusivity_violations: int = 0
    pending_left: int = -1
    dead_letters: int = 0
    broker_dlq: int = 0
    retried_versions: int = 0
    errors: int = 0
    producer_resends: int = 0
    recovery_s: list[float] = field(default_factory=list)
    progress_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    repetition: int = 1

    def check(self, *, dead_letters: int = 0) -> None:
        assert self.lost == 0, self
        assert self.contradictory == 0 and self.duplicate_jobs == 0, self
        assert self.identity_mismatches == 0, self
        assert self.exclusivity_violations == 0, self
        assert self.pending_left == 0, self
        assert self.dead_letters == dead_letters and self.broker_dlq == 0, self


def judge(
    *, figures: Figures, collector: Collector, kube: Any, namespace: str, facility: Facility,
    sent: list[dict[str, Any]], settle_s: float = 3.0, pods: PodRecorder | None = None,
) -> Figures:
    """Fill ``figures`` from the broker's and the API's records (call once all is done)."""
    time.sleep(settle_s)  # anything still to arrive would be a duplicate
    finals: dict[tuple[int, int], list[Seen]] = defaultdict(list)
    for seen in collector.finals():
        body = seen.json()
        if isinstance(body.get("run_number"), int):
            finals[(body["run_number"], int(body.get("run_version") or 0))].append(seen)
    jobs = list_jobs(kube, namespace)
    job_keys = Counter(
        (int(j["metadata"]["labels"]["autoreduce.io/run-number"]),
         int(j["metadata"]["labels"]["autoreduce.io/run-version"]))
        for j in jobs
    )
    expected = {(int(m["run_number"]), 0) for m in sent} | set(job_keys)
    figures.outcomes = sum(len(v) for v in finals.values())
    figures.lost = sum(1 for key in expected if not finals.get(key))
    figures.duplicated = sum(len(v) - 1 for v in finals.values() if len(v) > 1)
    for copies in finals.values():
        kinds = {seen.destination for seen in copies}
        if len(kinds) > 1:
            figures.contradictory += 1
        else:
            figures.repeats += len(copies) - 1
            figures.unmarked_repeats += sum(
                1 for seen in copies[1:] if seen.headers.get(POSSIBLE_REPEAT_HEADER) != "true")
        if len({seen.headers.get(OUTCOME_ID_HEADER) for seen in copies}) > 1:
            figures.identity_mismatches += 1
    figures.jobs = len(jobs)
    figures.duplicate_jobs = sum(n - 1 for n in job_keys.values() if n > 1)
    figures.retried_versions = sum(1 for _, version in job_keys if version > 0)
    figures.errors = len(collector.on("error"))
    found = exclusivity_violations(jobs=jobs, timeline=read_timeline(facility),
                                   pod_spans=pods.spans_by_rb() if pods else None)
    figures.exclusivity_violations = sum(overlap.count for overlap in found)
    figures.notes += [f"exclusivity: {overlap}" for overlap in found[:5]]
    if pods and pods.unrecorded:
        figures.notes.append(f"{len(pods.unrecorded)} pod(s) ContainerStatusUnknown: judged "
                             "by their scripts' timeline and Job holds only")
    queues = collector.settings.queues
    figures.pending_left = browse_count(collector.settings, queues.pending)
    figures.dead_letters = len(collector.on("dead_letter"))
    figures.broker_dlq = browse_count(
        collector.settings, "/queue/ActiveMQ.DLQ",
        match=lambda d: queues.pending.rsplit("/", 1)[-1] in str(d.headers))
    if figures.lost or figures.duplicated:
        missing = sorted(key for key in expected if not finals.get(key))[:10]
        doubled = {f"{k[0]}v{k[1]}": [s.destination for s in v]
                   for k, v in finals.items() if len(v) > 1}
        figures.notes.append(f"missing: {missing}; doubled: {dict(list(doubled.items())[:10])}")
    return figures


def record(figures: Figures) -> None:
    """Print the figures and keep them in bench/results/faults.{json,md}."""
    entry: dict[str, Any] = dict(figures.__dict__)
    entry["recovery_s"] = [round(x, 2) for x in figures.recovery_s]
    entry["progress_s"] = [round(x, 2) for x in figures.progress_s]
    entry["duration_s"] = round(figures.duration_s, 1)
    entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                     capture_output=True, text=True, check=False).stdout.strip()
    print(f"\nFAULT FIGURES {json.dumps(entry)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "faults.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    key = f"{figures.scenario}/{figures.mode}"
    if figures.mode == "long":  # every long repetition is a row of its own
        key += f"/{entry['commit']}/{figures.repetition}"
    results[key] = entry
    path.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    (RESULTS / "faults.md").write_text(markdown(results))


def record_fuzz(*, mode: str, cases: int, sent: int, broker_refused: int, dead_lettered: int,
                jobs: int, dispatcher_alive: bool) -> None:
    """Keep the broker fuzz figures next to the fault figures."""
    path = RESULTS / "faults.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results[f"fuzz/{mode}"] = {
        "scenario": "fuzz", "mode": mode, "cases": cases, "sent": sent,
        "broker_refused": broker_refused, "dead_lettered": dead_lettered, "jobs": jobs,
        "dispatcher_alive": dispatcher_alive,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    (RESULTS / "faults.md").write_text(markdown(results))


def _repeats(entry: dict[str, Any]) -> str:
    if "repeats" not in entry:  # a row from before repeats were told apart
        return f"({entry['duplicated']} duplicated, kinds not told apart)"
    unmarked = entry.get("unmarked_repeats", 0)
    return f"{entry['repeats']}" + (f" ({unmarked} unmarked)" if unmarked else "")


def markdown(results: dict[str, dict[str, Any]]) -> str:
    head = ("| scenario | mode | rep | runs | RBs | faults | outcomes | lost | contradictory | "
            "repeats (same kind, same id) | dup Jobs | exclusivity violations | pending left | "
            "DLQ | retried | "
            "recovery s (max) | first outcome after fault s (max) | duration s | "
            "when (UTC) | commit |")
    lines = [
        "# Fault suite results",
        "",
        "Written by `tests/faults` (short: CI; long: `pytest --long tests/faults`). "
        "Every figure comes from the broker's and the API's own records: outcome messages "
        "(broker redeliveries counted once), Jobs, the scripts' timeline, a browse of the "
        "pending queue and the DLQs. Recovery = fault cleared until the dispatcher's "
        "/readyz is 200 again. Exclusivity is judged on the scripts' own timeline, the "
        "runner containers' real start/finish times and each Job's hold on its RB (start "
        "to final Complete/Failed condition). A run that ever gets two different "
        "outcome kinds is a failure; repeats of the same kind carry the same "
        "`autoreduce-outcome-id` and are counted in their own column. Long scenarios run "
        "several times (`--repeat N`): one row per repetition, with its commit.",
        "",
        head,
        "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|",
    ]
    faults = {k: v for k, v in results.items() if v.get("scenario") != "fuzz"}
    fuzz = [v for v in results.values() if v.get("scenario") == "fuzz"]
    for entry in faults.values():
        rec = max(entry.get("recovery_s") or [0])
        prog = max(entry.get("progress_s") or [0])
        lines.append(
            f"| {entry['scenario']} | {entry['mode']} | {entry.get('repetition', '-')} | "
            f"{entry['runs']} | {entry['rbs']} | "
            f"{entry['faults']} | {entry['outcomes']} | {entry['lost']} | "
            f"{entry.get('contradictory', '?')} | {_repeats(entry)} | {entry['duplicate_jobs']} | "
            f"{entry['exclusivity_violations']} | {entry['pending_left']} | "
            f"{entry['dead_letters'] + entry['broker_dlq']} | {entry['retried_versions']} | "
            f"{rec:.1f} | {prog:.1f} | {entry['duration_s']} | "
            f"{entry.get('when', '')} | {entry.get('commit', '')} |"
        )
    noted = [(k, n) for k, v in faults.items() for n in v.get("notes") or []
             if "readiness" not in n]
    if noted:
        lines += ["", "Notes:", ""] + [f"- {key}: {note}" for key, note in noted]
    if fuzz:
        lines += [
            "",
            "Fuzzed frames (hypothesis bodies and headers) through the broker into a running "
            "dispatcher: each must be dead-lettered with a reason exactly when the message "
            "validation refuses it, else become a Job; the pending queue ends empty.",
            "",
            "| mode | cases | sent | refused by the broker itself | dead-lettered | Jobs | "
            "dispatcher up |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {f['mode']} | {f['cases']} | {f['sent']} | {f['broker_refused']} | "
            f"{f['dead_lettered']} | {f['jobs']} | {f['dispatcher_alive']} |"
            for f in fuzz
        ]
    return "\n".join(lines) + "\n"

"""End to end on the real node: message -> ReductionStarted, beside the raw
"create a Job, wait until its pod runs" on the same node in the same run (issue 18).

The raw side creates the very Job the dispatcher would (rendered from the same
template and settings, already running, its ConfigMap first) with our own API client
and polls the Job's pod until the kubelet reports it Running: the floor any
dispatcher sits on. The product side sends the run's message and waits for the
runner's ReductionStarted, which adds the broker, the dispatcher's intake and
admission, and the runner's own start (Python, connecting to its poster sidecar,
the broker's receipt). One run at a time on an idle node, RBs free: direct admission.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from autoreduce_common.messages import parse_run

from bench.env import Scenario, Stack, run_body
from bench.machine import load
from bench.stats import summary
from dispatcher.config import DispatcherSettings
from dispatcher.identity import job_name, run_key
from dispatcher.manifests import Arrival, load_template, render_config_map, render_job

SCRIPT = "def main(input_file, output_dir):\n    pass\n"
POLL_S = 0.02  # the raw side's poll: at most this much is added to its figure


Numbers = Callable[[], int]  # the next unused run (or RB) number of the bench


def startup(stack: Stack, *, runs: int, next_run: Numbers, next_rb: Numbers,
            product: dict[str, Any]) -> dict[str, Any]:
    """``product``: the poster scenario's runs with the sidecar (the product's default
    pod), measured by ``bench.scenarios._poster_runs`` in the same stack."""
    raw = _raw(stack, runs=runs, next_run=next_run, next_rb=next_rb)
    raw_p50 = (raw["to_running"] or {}).get("p50")
    started_p50 = (product["to_started"] or {}).get("p50")
    return {
        "what": f"{runs} runs per side, one at a time, free RBs, the real runner: raw = "
        "our client creates the dispatcher's own Job (ConfigMap first, running) and polls "
        f"its pod every {POLL_S * 1000:.0f} ms until Running; product = run message sent "
        "-> ReductionStarted received, after one uncounted run (the node's first "
        "container unpacks the image)",
        "raw": raw,
        "product": product,
        "started_p50_over_raw_running_p50": (
            started_p50 / raw_p50 if raw_p50 and started_p50 is not None else None),
    }


def _raw(stack: Stack, *, runs: int, next_run: Numbers, next_rb: Numbers) -> dict[str, Any]:
    scenario = Scenario(stack, "startup-raw")
    try:
        settings = DispatcherSettings.model_validate(scenario.real_runner_settings())
        template = load_template(settings.jobs.template_path)
        kube = stack.kube_client(scenario.namespace)
        to_running, to_started = [], []
        reader = scenario.outcome_reader()
        load_before = load()
        for _ in range(runs):
            run = next_run()
            body = run_body(instrument="LET", rb=next_rb(), run=run, script=SCRIPT,
                            data=scenario.data_file("LET", run))
            raw_message, message = parse_run(body)
            key = run_key(message)
            job = render_job(settings=settings, template=template, key=key,
                             arrival=Arrival(priority=4, enqueued_ms=0, message_id=""))
            job["spec"]["suspend"] = False
            # No dispatcher settles these pods: no finalizer to wait for one.
            job["spec"]["template"]["metadata"].pop("finalizers", None)
            kube.create_config_map(render_config_map(settings=settings, key=key,
                                                     raw=raw_message))
            created = time.monotonic()
            kube.create_job(job)
            to_running.append(_wait_running(kube, job_name(key)) - created)
            to_started.append(reader.wait_for_run(scenario.broker_queue("started"), run,
                                                  timeout=120) - created)
            reader.wait_for_run(scenario.broker_queue("complete"), run, timeout=120)
        reader.close()
        return {"to_running": summary(to_running), "to_started": summary(to_started),
                "load": [load_before, load()]}
    finally:
        scenario.stop()


def _wait_running(kube: Any, job: str, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = kube.list_pods(selector=f"batch.kubernetes.io/job-name={job}")
        if any((pod.get("status") or {}).get("phase") == "Running" for pod in pods):
            return time.monotonic()
        time.sleep(POLL_S)
    raise RuntimeError(f"no pod of Job {job} Running within {timeout} s")

"""``python -m bench.listcost [JOBS]``: what a run's message in its Job costs a restart.

A restarted dispatcher lists every Job before it consumes (``Kube.list_jobs``, paged,
each Job slimmed as it arrives). This creates JOBS suspended run Jobs twice, in two
namespaces: rendered with the message in the Job (a pod-template annotation, the
default since 991ccd7) and without it (the message in a ConfigMap, as before), then
lists each namespace in turn, several times, with the dispatcher's own call. Nothing
else runs on the stack, so the two are measured under the same load.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autoreduce_common.messages import parse_run

from bench.env import Stack, run_body
from bench.scenarios import _concurrently
from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels, run_key
from dispatcher.jobcache import slim
from dispatcher.manifests import Arrival, inline_message, load_template, render_job

ROUNDS = 5


def _fill(stack: Stack, namespace: str, jobs: int, *, inline: bool) -> float:
    """Create the Jobs; the mean bytes of one as the API server returns it."""
    stack.kube.create_namespace(namespace)
    settings = DispatcherSettings.model_validate({"jobs": {"namespace": namespace}})
    template = load_template(settings.jobs.template_path)
    kube = stack.kube_client(namespace)
    bodies = []
    for run in range(1, jobs + 1):
        raw, message = parse_run(run_body(instrument="WISH", rb=2_000_000 + run % 500, run=run))
        bodies.append(render_job(
            settings=settings, template=template, key=run_key(message),
            arrival=Arrival(priority=4, enqueued_ms=0, message_id=str(run)),
            message=inline_message(settings, raw) if inline else None))

    def create(body: dict[str, Any]) -> float:
        kube.create_job(body)
        return 0.0

    _concurrently(bodies, create, threads=4)
    one = kube.get_job(bodies[0]["metadata"]["name"]) or {}
    one.get("metadata", {}).pop("managedFields", None)  # as the list's bytes are decoded
    return float(len(json.dumps(one)))


def _list_s(stack: Stack, namespace: str) -> float:
    kube = stack.kube_client(namespace)
    started = time.monotonic()
    jobs, _ = kube.list_jobs(selector=Labels("autoreduce.io").selector(), keep=slim)
    assert jobs, namespace
    return time.monotonic() - started


def main() -> int:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    workdir = Path(tempfile.mkdtemp(prefix="autoreduce-bench-", dir="/var/tmp"))
    stack = Stack.start(workdir, keep_files=False)
    try:
        sizes = {mode: _fill(stack, f"list-{mode}", jobs, inline=mode == "inline")
                 for mode in ("configmap", "inline")}
        time.sleep(30)  # let the Job controller's status writes for the new Jobs pass
        times: dict[str, list[float]] = {"configmap": [], "inline": []}
        for _ in range(ROUNDS):
            for mode, found in times.items():
                found.append(_list_s(stack, f"list-{mode}"))
        print(f"{jobs} suspended Jobs per namespace, {ROUNDS} lists each, alternating")
        for mode, found in times.items():
            print(f"{mode:9} one Job {sizes[mode]:.0f} bytes without managedFields; list+slim "
                  f"median {statistics.median(found):.2f} s, "
                  f"all {', '.join(f'{t:.2f}' for t in found)}")
        return 0
    finally:
        stack.stop(keep_files=False)


if __name__ == "__main__":
    sys.exit(main())

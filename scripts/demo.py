"""The local demo: a real broker, a real control plane, the dispatcher, and runs reduced.

Run through ``scripts/demo.sh`` (which installs what is missing first). Everything
runs on this machine: ActiveMQ, etcd + kube-apiserver + kube-controller-manager,
and the test node agent that runs reduction pods as local processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "common"), str(REPO / "runner-image")]

from kubernetes import client as k8s  # noqa: E402

from autoreduce_common.broker_settings import BrokerSettings, QueueNames  # noqa: E402
from autoreduce_common.stomp_client import StompClient  # noqa: E402
from tests.conftest import QueueReader  # noqa: E402
from tests.harness.activemq import ActiveMQ, free_port  # noqa: E402
from tests.harness.controlplane import start_local_stack  # noqa: E402
from tests.harness.product import (  # noqa: E402
    DispatcherProcess,
    Facility,
    dispatcher_settings,
    pod_user,
    run_message,
)

NAMESPACE = "autoreduce"

GOOD_SCRIPT = """
import time
import reduce_vars as web_var

def main(input_file, output_dir):
    print(f"Reducing {input_file} with binning {web_var.standard_vars['binning']}")
    for step in range(3):
        print(f"  step {step + 1}/3", flush=True)
        time.sleep(0.5)
    with open(f"{output_dir}/reduced.txt", "w") as out:
        out.write(f"reduced {input_file}\\n")
"""

BROKEN_SCRIPT = """
def main(input_file, output_dir):
    print("About to divide by zero")
    return 1 / 0
"""


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoreduce-demo-"))
    say(f"working in {work}")
    broker = ActiveMQ(workdir=work / "activemq", port=free_port())
    broker.workdir.mkdir(parents=True)
    say("starting ActiveMQ (STOMP on 127.0.0.1:%d)" % broker.port)
    broker.start()
    say("starting etcd, kube-apiserver, kube-controller-manager and a node agent")
    kube = start_local_stack(workdir=work / "kube")
    try:
        return demo(work=work, broker=broker, kube=kube, keep=args.keep)
    finally:
        if not args.keep:
            say("tearing down")
            kube.stop()
            broker.stop()
            shutil.rmtree(work, ignore_errors=True)


def demo(*, work: Path, broker: ActiveMQ, kube: Any, keep: bool) -> int:
    settings = BrokerSettings(hosts=[broker.host], username=broker.user,
                              password=broker.password, queues=QueueNames())
    kube.create_namespace(NAMESPACE)
    k8s.CoreV1Api(kube.api_client()).create_namespaced_secret(NAMESPACE, {
        "metadata": {"name": "autoreduce-broker"},
        "stringData": {"password": broker.password},
    })
    facility = Facility(work / "facility").create()
    password = work / "broker-password"
    password.write_text(broker.password)
    dispatcher = DispatcherProcess(
        workdir=work, kubeconfig=kube.kubeconfig,
        settings=dispatcher_settings(broker=settings, password_file=password,
                                     namespace=NAMESPACE, facility=facility,
                                     run_as_user=pod_user()),
    ).start()
    say("dispatcher started (python -m dispatcher); its log: " + str(dispatcher.log_path))
    reader = QueueReader(settings)
    for queue in (settings.queues.started, settings.queues.complete, settings.queues.error,
                  settings.queues.skipped):
        reader.watch(queue)
    sender = StompClient(settings=settings, client_name="demo")
    sender.connect()
    runs = [
        run_message(facility=facility, instrument="WISH", rb=1920001, run=44001,
                    script=GOOD_SCRIPT, reduction_arguments={
                        "standard_vars": {"binning": "0.5,-0.004,10"}, "advanced_vars": {}}),
        run_message(facility=facility, instrument="WISH", rb=1920001, run=44002,
                    script=GOOD_SCRIPT, reduction_arguments={
                        "standard_vars": {"binning": "1,-0.004,10"}, "advanced_vars": {}}),
        run_message(facility=facility, instrument="LET", rb=1920002, run=9001,
                    script=BROKEN_SCRIPT),
    ]
    say("submitting 3 runs: two of RB 1920001 (one at a time), one of RB 1920002 that fails")
    for run in runs:
        sender.send(destination=settings.queues.pending, body=json.dumps(run).encode(),
                    priority=9)
    final = {settings.queues.complete, settings.queues.error, settings.queues.skipped}
    reader.wait_for(lambda seen: sum(d.destination in final for d in seen) >= 3, timeout=180)
    say("outcome messages, in the order they arrived:")
    for delivery in reader.seen:
        body = json.loads(delivery.body)
        where = delivery.destination.rsplit("/", 1)[-1]
        extra = body.get("message") or ", ".join(body.get("reduction_data") or []) or ""
        print(f"  {where:<20} {body['instrument']:<5} run {body['run_number']:<6} {extra}")
    say("kubectl get jobs -n autoreduce -L autoreduce.io/rb-number")
    print(kube.kubectl("get", "jobs", "-n", NAMESPACE, "-L", "autoreduce.io/rb-number").stdout)
    jobs = k8s.BatchV1Api(kube.api_client()).list_namespaced_job(NAMESPACE).items
    first = sorted(jobs, key=lambda j: j.metadata.creation_timestamp)[0].metadata.name
    say(f"kubectl logs -n autoreduce job/{first}")
    print(kube.kubectl("logs", "-n", NAMESPACE, f"job/{first}").stdout)
    outputs = sorted(str(p.relative_to(facility.output)) for p in facility.output.rglob("*.txt"))
    say("reduced data on the output share: " + ", ".join(outputs))
    if keep:
        say(f"stack left running; KUBECONFIG={kube.kubeconfig}; broker {broker.host}")
        time.sleep(10**9)
    sender.disconnect()
    reader.close()
    dispatcher.stop()
    ok = len(reader.bodies(settings.queues.complete)) == 2 and len(
        reader.bodies(settings.queues.error)) == 1
    say("demo finished: " + ("as expected" if ok else "UNEXPECTED outcomes"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

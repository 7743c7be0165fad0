"""The local demo: the whole product on this machine, in a few minutes.

Run through ``scripts/demo.sh`` (which installs what is missing first). It starts a
real ActiveMQ broker and a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler), builds the product's two images from
Dockerfile.dispatcher and Dockerfile.runner (cached after the first run) and starts a
real node (containerd + kubelet) that runs them; ``helm install``s the chart with its
default images (the dispatcher runs as a Deployment pod on that node), runs
``helm test`` (a canary run through broker, dispatcher and a runner pod), submits
sample runs with the ``autoreduce`` CLI (two sharing an experiment, one that fails,
one that is cancelled while it waits, one malformed message), each reduced in a Job's
container on the node, and shows how to look at what happened. ``--keep`` leaves
everything running for you to explore.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "common"), str(REPO / "runner-image")]

from autoreduce_common.broker_settings import BrokerSettings, QueueNames  # noqa: E402
from autoreduce_common.stomp_client import Delivery, StompClient  # noqa: E402

from devstack.activemq import ActiveMQ, free_port  # noqa: E402
from devstack.product import PYTHONPATH, Facility  # noqa: E402
from devstack.queues import QueueReader  # noqa: E402
from devstack.stack import Stack, stop_on_signals  # noqa: E402
from dispatcher.identity import RunKey, job_name  # noqa: E402

NAMESPACE = "autoreduce"
RELEASE = "autoreduce"
CHART = REPO / "helm" / "autoreduce"
CANARY = "CANARY"  # the chart's helmTest.instrument
# What the operator types to reach the dispatcher's metrics (the pod's own network).
PORT_FORWARD = f"kubectl port-forward -n {NAMESPACE} deploy/{RELEASE} {{local}}:http"

GOOD_SCRIPT = """\
import time
import reduce_vars as web_var

def main(input_file, output_dir):
    print(f"Reducing {input_file} with binning {web_var.standard_vars.get('binning')}")
    for step in range(6):
        print(f"  step {step + 1}/6", flush=True)
        time.sleep(1)
    with open(f"{output_dir}/reduced.txt", "w") as out:
        out.write(f"reduced {input_file}\\n")
"""

BROKEN_SCRIPT = """\
def main(input_file, output_dir):
    print("About to divide by zero")
    return 1 / 0
"""


def say(text: str) -> None:
    bold = sys.stdout.isatty()
    print(f"\033[1m==> {text}\033[0m" if bold else f"==> {text}", flush=True)


def show(command: str, output: str) -> None:
    """Print a command the reader can type, and what it printed."""
    print(f"$ {command}", flush=True)
    print(output.rstrip() + "\n", flush=True)


def helm_binary() -> str:
    for candidate in (os.environ.get("AUTOREDUCE_HELM"), shutil.which("helm"),
                      str(Path.home() / ".cache" / "autoreduce" / "bin" / "helm")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no helm binary: run scripts/demo.sh (it installs one)")


def chart_values(*, broker: ActiveMQ, facility: Facility) -> dict[str, Any]:
    """Values for this machine: the broker on the host's address (the node relays its
    port), archive/output as host folders. Images, security contexts, ports and the
    update strategy are the chart's defaults: the stack built the images the chart
    names (autoreduce-dispatcher and autoreduce-runner at the chart's appVersion)."""
    return {
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 1},
        "logJson": True,
        # The product's two broker identities: the runners' may only send outcomes.
        "broker": {"hosts": [broker.host], "username": broker.dispatcher.user,
                   "password": broker.dispatcher.password,
                   "runner": {"username": broker.runner.user,
                              "password": broker.runner.password}},
        "jobs": {"ttlSecondsAfterFinished": 3600},
        "runner": {
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          "limits": {"memory": "1Gi"}},
            "activeDeadlineSeconds": 300,
            "archiveVolumes": [{"name": "archive", "mountPath": "/isis",
                                "source": {"hostPath": {"path": str(facility.archive)}}}],
            "outputVolumes": [{"name": "output", "mountPath": "/instrument",
                               "source": {"hostPath": {"path": str(facility.output)}}}],
        },
    }


def without_notes(text: str) -> str:
    """`helm test` output without the chart's NOTES block (shown at install)."""
    return text.split("NOTES:", 1)[0]


def fetch_metrics(forward: subprocess.Popen[str], local: int) -> str | None:
    """/metrics through the port-forward, or None while it is not forwarding yet."""
    if forward.poll() is not None:
        output = forward.stdout.read() if forward.stdout else ""
        raise SystemExit(f"kubectl port-forward exited {forward.returncode}:\n{output}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


class Demo:
    def __init__(self, *, work: Path, broker: ActiveMQ, kube: Any) -> None:
        self.work = work
        self.broker = broker
        self.kube = kube
        self.facility = Facility(work / "facility").create()
        self.cli_config = work / "autoreduce.yaml"
        self.env = {**os.environ, "PYTHONPATH": PYTHONPATH, "KUBECONFIG": str(kube.kubeconfig)}

    # -- helpers -------------------------------------------------------------------------

    def kubectl(self, *args: str) -> str:
        result = self.kube.kubectl(*args)
        return result.stdout + result.stderr

    def autoreduce(self, *args: str, quiet: bool = False) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "autoreduce_cli", *args, "--config", str(self.cli_config)],
            capture_output=True, text=True, env=self.env, cwd=REPO, timeout=300, check=False)
        output = result.stdout + result.stderr
        if not quiet:
            show("autoreduce " + shlex.join(args), output)
        return output

    def wait(self, what: str, check: Any, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.5)
        raise SystemExit(f"demo: timed out waiting for {what}")

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [helm_binary(), "--kubeconfig", str(self.kube.kubeconfig), *args],
            capture_output=True, text=True, timeout=600, check=False)

    def port_forward(self, local: int) -> subprocess.Popen[str]:
        """``kubectl port-forward`` to the dispatcher's named ``http`` port; stop it after."""
        return subprocess.Popen(
            [self.kube.kubectl_binary, "--kubeconfig", str(self.kube.kubeconfig),
             *PORT_FORWARD.format(local=local).split()[1:]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def show_metrics(self) -> None:
        local = free_port()
        forward = self.port_forward(local)
        try:
            metrics = self.wait("the port-forward", lambda: fetch_metrics(forward, local),
                                timeout=30)
        finally:
            forward.terminate()
            forward.wait(timeout=10)
        wanted = ("autoreduce_runs_received_total", "autoreduce_runs_accepted_total",
                  "autoreduce_runs_rejected_total", "autoreduce_cancel_requests_total",
                  "autoreduce_runs_admitted_total", "autoreduce_outcomes_on_behalf_total",
                  "autoreduce_admission_seconds_count")
        lines = [line for line in metrics.splitlines() if line.startswith(wanted)]
        print(f"$ {PORT_FORWARD.format(local=local)} &", flush=True)
        show(f"curl -s 127.0.0.1:{local}/metrics | grep ^autoreduce_", "\n".join(lines))

    # -- steps ---------------------------------------------------------------------------

    def install(self) -> None:
        values = self.work / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values(broker=self.broker,
                                                      facility=self.facility)))
        say(f"helm install {RELEASE} helm/autoreduce -n {NAMESPACE} -f values.yaml")
        result = self.helm("install", RELEASE, str(CHART), "-n", NAMESPACE,
                           "--create-namespace", "-f", str(values))
        if result.returncode != 0:
            raise SystemExit(f"helm install failed:\n{result.stderr}")
        say("the dispatcher pod starts: the kubelet on node-1 runs the "
            "autoreduce-dispatcher image in containerd")
        selector = "app.kubernetes.io/component=dispatcher"
        self.wait("a Ready dispatcher pod", lambda: "True" in self.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", selector, "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}"))
        show(f"kubectl get pods -n {NAMESPACE} -o wide",
             self.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"))
        # The CLI reads the dispatcher's settings; here a small file says where things are.
        password = self.work / "broker-password"
        password.write_text(self.broker.dispatcher.password)
        self.cli_config.write_text(yaml.safe_dump({
            "broker": {"hosts": [self.broker.host], "username": self.broker.dispatcher.user,
                       "password_file": str(password)},
            "jobs": {"namespace": NAMESPACE},
        }))

    def canary(self) -> None:
        say(f"helm test {RELEASE}: a canary run through broker, dispatcher and a runner pod")
        result = self.helm("test", RELEASE, "-n", NAMESPACE)
        show(f"helm test {RELEASE} -n {NAMESPACE}   (NOTES left out)",
             without_notes(result.stdout) + result.stderr)
        job = f"job/{RELEASE}-canary"
        show(f"kubectl logs -n {NAMESPACE} {job}   (what the canary saw)",
             self.kubectl("logs", "-n", NAMESPACE, job))
        if result.returncode != 0:
            raise SystemExit("demo: helm test failed (the canary's log above says why)")

    def submit(self) -> dict[str, str]:
        scripts = self.work / "scripts"
        scripts.mkdir()
        (scripts / "reduce.py").write_text(GOOD_SCRIPT)
        (scripts / "broken_reduce.py").write_text(BROKEN_SCRIPT)
        f = self.facility
        say("submitting runs with `autoreduce submit` (as the legacy manual submission: "
            "priority 1, started_by -1)")
        print("   WISH 44001 and 44002 and 44003 share RB 1920001: one at a time, in order;\n"
              "   LET 9001 (RB 1920002) runs a script that fails; WISH 44003 gets cancelled.\n")
        args = '{"standard_vars": {"binning": "0.5,-0.004,10"}}'
        for run in (44001, 44002, 44003):
            self.autoreduce("submit", f.data_file("WISH", run), str(scripts / "reduce.py"),
                            "--rb", "1920001", "--arguments", args, "--no-wait")
        self.autoreduce("submit", f.data_file("LET", 9001), str(scripts / "broken_reduce.py"),
                        "--rb", "1920002", "--no-wait")
        return {
            "first": job_name(RunKey("ISIS", "WISH", (44001,), 0, "1920001")),
            "second": job_name(RunKey("ISIS", "WISH", (44002,), 0, "1920001")),
            "cancelled": job_name(RunKey("ISIS", "WISH", (44003,), 0, "1920001")),
        }

    def status_while_running(self, jobs: dict[str, str]) -> None:
        def busy() -> bool:
            out = self.autoreduce("status", "-o", "json", quiet=True)
            try:
                status = json.loads(out)
            except ValueError:
                return False
            return len(status["running"]) >= 1 and len(status["waiting"]) >= 2
        self.wait("runs reducing and waiting", busy, timeout=60)
        say("while they run: who is reducing, who waits and why")
        self.autoreduce("status")
        say("cancel WISH 44003 while it waits (the run message's identity, as the web app does)")
        self.autoreduce("cancel", "--instrument", "WISH", "--rb", "1920001", "--run", "44003",
                        "--version", "0")

    def bad_message(self, sender: StompClient, queues: QueueNames) -> None:
        say("a producer sends a malformed run (reduction_arguments is not an object)")
        bad = {"data": self.facility.data_file("MARI", 25581), "instrument": "MARI",
               "rb_number": 1920003, "run_number": 25581, "reduction_script": "",
               "reduction_arguments": "oops"}
        sender.send(destination=queues.pending, body=json.dumps(bad).encode(), priority=9)

    def outcomes(self, reader: QueueReader, queues: QueueNames) -> bool:
        final = {queues.complete, queues.error, queues.skipped}

        def ours(delivery: Delivery) -> bool:  # not the helm test canary's run
            return bool(json.loads(delivery.body).get("instrument") != CANARY)

        say("waiting for every run's outcome message (the web app would record these)")
        reader.wait_for(lambda seen: sum(d.destination in final and ours(d) for d in seen) >= 5,
                        timeout=240)
        say("outcome messages, in the order they arrived (CANARY: the helm test run):")
        for delivery in reader.seen:
            body = json.loads(delivery.body)
            where = delivery.destination.rsplit("/", 1)[-1]
            extra = body.get("message") or ", ".join(body.get("reduction_data") or []) or ""
            print(f"   {where:<18} {body['instrument']:<6} run {body['run_number']:<11} "
                  f"{str(extra)[:86]}")
        print()
        complete = [d for d in reader.seen if d.destination == queues.complete and ours(d)]
        errors = [d for d in reader.seen if d.destination == queues.error and ours(d)]
        return len(complete) == 2 and len(errors) == 3

    def look(self, jobs: dict[str, str]) -> None:
        say("how to look: the CLI")
        self.wait("all runs finished", lambda: '"running": []' in self.autoreduce(
            "status", "-o", "json", quiet=True), timeout=60)
        self.autoreduce("status")
        # One run's whole story: it waited for its RB, then reduced.
        self.autoreduce("explain", "wish", "44002")
        self.autoreduce("dead-letters", "list")
        print("   (`autoreduce dead-letters show <id>` prints it whole; `requeue <id>` sends it\n"
              "    back to the pending queue once the producer's bug is understood)\n")
        say("how to look: kubectl (the cluster is the queue; labels answer every question)")
        show(f"kubectl get jobs -n {NAMESPACE} -L autoreduce.io/rb-number,autoreduce.io/instrument",
             self.kubectl("get", "jobs", "-n", NAMESPACE, "-L",
                          "autoreduce.io/rb-number,autoreduce.io/instrument"))
        described = self.kubectl("describe", "job", jobs["second"], "-n", NAMESPACE)
        show(f"kubectl describe job {jobs['second']} -n {NAMESPACE}   (the Events part)",
             "Events:" + described.split("Events:", 1)[-1])
        show(f"kubectl logs -n {NAMESPACE} job/{jobs['first']}   (live while it runs: add -f)",
             self.kubectl("logs", "-n", NAMESPACE, f"job/{jobs['first']}"))
        pod = self.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                           f"batch.kubernetes.io/job-name={jobs['first']}", "-o", "name").split()
        if pod:
            described = self.kubectl("describe", pod[0], "-n", NAMESPACE)
            show(f"kubectl describe -n {NAMESPACE} {pod[0]}   (the kubelet's Events)",
                 "Events:" + described.split("Events:", 1)[-1])
        say("how to look: Prometheus metrics (the dispatcher pod has its own network: "
            "port-forward to its http port)")
        self.show_metrics()
        outputs = sorted(str(p.relative_to(self.facility.output))
                         for p in self.facility.output.rglob("reduced.txt"))
        say("reduced data on the output share:")
        print("\n".join(f"   {path}" for path in outputs) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args()
    # SIGTERM and SIGHUP stop the demo as Ctrl-C does: everything is torn down.
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="autoreduce-demo-"))
    # Pods run as another user and must reach the facility folders inside.
    os.chmod(work, 0o755)  # noqa: S103 - world-readable on purpose, not writable
    say(f"working in {work}")
    say("starting ActiveMQ, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        "building the images (cached after the first run) and starting node-1 "
        "(containerd + kubelet)")
    started = time.monotonic()
    try:
        stack = Stack.start(work)
    except KeyboardInterrupt:
        say(f"interrupted while starting; what was started is stopped, logs kept in {work}")
        return 130
    say(f"stack {stack.stack_id} up in {time.monotonic() - started:.0f} s; "
        f"ActiveMQ on {stack.broker.host}; "
        "images on the node: " + ", ".join(sorted(stack.kube.images.values())))
    result = 1
    try:
        result = demo(Demo(work=work, broker=stack.broker, kube=stack.kube), keep=args.keep)
    except KeyboardInterrupt:
        say("interrupted")
        result = 130
    finally:
        say("tearing down: every process the stack started, the node's containers, mounts, "
            "namespace and cgroups")
        stack.stop(keep_files=result != 0)
        if result != 0:
            say(f"kept {work}: every component's log is there")
    return result


def demo(d: Demo, *, keep: bool) -> int:
    d.install()
    # The broker's own admin identity stands in for the web app and run detection.
    settings = BrokerSettings(hosts=[d.broker.host], username=d.broker.user,
                              password=d.broker.password, queues=QueueNames())
    queues = settings.queues
    # Stands in for the web app: reads the outcome queues.
    reader = QueueReader(settings)
    for queue in (queues.started, queues.complete, queues.error, queues.skipped):
        reader.watch(queue)
    # With the stand-in web app listening, as in production: it takes the canary's
    # outcome too, and the canary shows the evidence it used instead.
    d.canary()
    sender = StompClient(settings=settings, client_name="demo")
    sender.connect()
    jobs = d.submit()
    d.status_while_running(jobs)
    d.bad_message(sender, queues)
    ok = d.outcomes(reader, queues)
    d.look(jobs)
    sender.disconnect()
    reader.close()
    say("demo finished: " + ("as expected (2 Complete, 1 failed, 1 cancelled, 1 dead-lettered)"
                             if ok else "UNEXPECTED outcomes"))
    if keep:
        # The hint is printed inside the try: a Ctrl-C that comes the moment it shows
        # is the user's asked-for stop, not an interruption of the demo.
        try:
            say("left running. In another shell:")
            print(f"   export KUBECONFIG={d.kube.kubeconfig}\n"
                  f"   export PATH={REPO}/.venv/bin:$PATH\n"
                  f"   autoreduce status --watch --config {d.cli_config}\n"
                  f"   kubectl get jobs -n {NAMESPACE}\n"
                  f"   kubectl logs -n {NAMESPACE} deploy/{RELEASE}\n"
                  f"   helm test {RELEASE} -n {NAMESPACE}\n"
                  f"   {PORT_FORWARD.format(local=8080)}\n"
                  "   Ctrl-C here stops everything.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

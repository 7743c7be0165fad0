"""Run the product's own processes against the real stack: dispatchers and run messages.

Used by the integration/e2e tests and by the demo. A dispatcher here is the real
``python -m dispatcher`` process with a settings file, so tests can SIGKILL it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from autoreduce_common.broker_settings import BrokerSettings

from devstack.paths import repo_root

REPO = repo_root()
PYTHONPATH = os.pathsep.join(str(REPO / part) for part in ("", "common", "runner-image"))


# The runner's uid in reduction pods (RunnerSpec's default); the facility's folders
# are world-writable so it can write them.
RUNNER_UID = 1000


@dataclass
class Facility:
    """Folders standing in for the archive (read-only in pods) and the output share."""

    root: Path

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def output(self) -> Path:
        return self.root / "output"

    def create(self) -> Facility:
        for path in (self.archive, self.output):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # pods run as uid 1000
        self.root.chmod(0o755)
        return self

    def data_file(self, instrument: str, run: int, cycle: str = "23_4") -> str:
        """A raw data file in the archive; returns its path as pods see it (/isis/...)."""
        relative = Path(f"NDX{instrument}/Instrument/data/cycle_{cycle}/{instrument}{run:08d}.nxs")
        path = self.archive / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"raw data of {instrument} run {run}\n")
        return f"/isis/{relative}"


BROKER_CA_CONFIG_MAP = "autoreduce-broker-ca"


def broker_ca_bundle(broker: BrokerSettings) -> dict[str, Any] | None:
    """The ConfigMap (a manifest) that gives runner pods the broker's CA, or None when
    the broker is plain STOMP. The caller creates it in the dispatcher's namespace."""
    if not broker.tls.enabled or broker.tls.ca_file is None:
        return None
    return {"metadata": {"name": BROKER_CA_CONFIG_MAP},
            "data": {"ca.crt": broker.tls.ca_file.read_text()}}


def dispatcher_settings(
    *,
    broker: BrokerSettings,
    password_file: Path,
    namespace: str,
    facility: Facility,
    run_as_user: int | None,
    runner_image: str,
    runner_username: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A settings file for a dispatcher on the local stack (plain dict, YAML-ready).
    ``runner_username``: the runner pods' broker user (their password is the
    ``autoreduce-broker`` Secret's), when they have their own."""
    settings: dict[str, Any] = {
        "broker": {
            "hosts": broker.hosts,
            "username": broker.username,
            "password_file": str(password_file),
            "queues": broker.queues.model_dump(),
            "heartbeat_ms": 5000,
            "reconnect_initial_s": 0.2,
            "reconnect_max_s": 2.0,
            "tls": broker.tls.model_dump(mode="json"),
        },
        "jobs": {"namespace": namespace, "ttl_seconds_after_finished": 3600,
                 "broker_username": runner_username,
                 # The runner pods' copy of the broker's CA (broker_ca_bundle).
                 "broker_ca_config_map": BROKER_CA_CONFIG_MAP if broker.tls.enabled else None},
        "runner": {
            "image": runner_image,
            # The chart's default: the nodes have the image, so nothing is pulled, and
            # an image they lack is tried (and fails at once: no registry is reachable).
            "image_pull_policy": "IfNotPresent",
            "run_as_user": run_as_user,
            "run_as_group": run_as_user,
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                          # a test evicts a pod for real by filling its /tmp past this
                          "limits": {"memory": "1Gi", "ephemeral-storage": "64Mi"}},
            "active_deadline_seconds": 300,
            "archive_volumes": [{"name": "archive", "mount_path": "/isis",
                                 "source": {"hostPath": {"path": str(facility.archive)}}}],
            "output_volumes": [{"name": "output", "mount_path": "/instrument",
                                "source": {"hostPath": {"path": str(facility.output)}}}],
            "env": {"AUTOREDUCE_TIMEOUT_S": "120"},
        },
        "concurrency": 4,
        "http_port": 0,
        "log_level": "INFO",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


@dataclass
class DispatcherProcess:
    """``python -m dispatcher`` as a child process with its own settings file."""

    workdir: Path
    settings: dict[str, Any]
    kubeconfig: Path
    name: str = "dispatcher"
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)
    # The benchmark runs the same main under a profiler (bench.profiled).
    module: str = "dispatcher"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> DispatcherProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"{self.name}.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        env = {
            **os.environ,
            "PYTHONPATH": PYTHONPATH,
            "AUTOREDUCE_IDENTITY": f"{self.name}-{self.starts}",
            **self.extra_env,
        }
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(config),
                 "--kubeconfig", str(self.kubeconfig)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def run_message(
    *,
    facility: Facility,
    instrument: str,
    rb: int | str,
    run: int,
    script: str,
    version: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A run message as a legacy producer sends it."""
    return {
        "data": facility.data_file(instrument, run),
        "facility": "ISIS",
        "instrument": instrument,
        "rb_number": rb,
        "run_number": run,
        "run_version": version,
        "reduction_script": script,
        "reduction_arguments": {"standard_vars": {}, "advanced_vars": {}},
        "started_by": 0,
        **extra,
    }


SLEEPY_SCRIPT = """
import json, os, time
def main(input_file, output_dir):
    # Record precise start/end so tests can check per-RB exclusivity.
    timeline = "/instrument/timeline.jsonl"
    with open(timeline, "a") as f:
        f.write(json.dumps({"event": "start", "file": input_file, "t": time.time()}) + "\\n")
    time.sleep(float(os.environ.get("SLEEP", "0.3")))
    with open(os.path.join(output_dir, "reduced.txt"), "w") as out:
        out.write("reduced " + input_file)
    with open(timeline, "a") as f:
        f.write(json.dumps({"event": "end", "file": input_file, "t": time.time()}) + "\\n")
"""


def read_timeline(facility: Facility) -> list[dict[str, Any]]:
    path = facility.output / "timeline.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


# A script writing through every path a reduction may use: Python, raw file
# descriptors (what C extensions do), a subprocess, and stderr; the lines, in order.
EVERY_OUTPUT_SCRIPT = """
import os, subprocess, sys
def main(input_file, output_dir):
    print("python-print")
    os.write(1, b"c-level-stdout\\n")
    os.write(2, b"c-level-stderr\\n")
    subprocess.run(["sh", "-c", "echo subprocess-stdout; echo subprocess-stderr >&2"], check=True)
    sys.stderr.write("python-stderr\\n")
"""
EVERY_OUTPUT_LINES = ["python-print", "c-level-stdout", "c-level-stderr", "subprocess-stdout",
                      "subprocess-stderr", "python-stderr"]

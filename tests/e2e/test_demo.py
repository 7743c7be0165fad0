"""The README's demo, end to end: scripts/demo.py brings up the stack, installs the
chart, submits the sample runs with the CLI, and must end as it says it does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import leftovers
from tests.harness.signals import as_a_background_job

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    bin_dir = os.environ.get("AUTOREDUCE_BIN", str(Path.home() / ".cache/autoreduce/bin"))
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.timeout(600)
def test_demo_runs_to_its_expected_end_and_ctrl_c_after_keep_stops_everything() -> None:
    # One demo run serves both checks (a demo is over a minute on this machine): it
    # must end as it says, and with --keep, once it waits, a Ctrl-C in its terminal
    # (SIGINT to its process group) must tear the whole stack down. Without --keep the
    # demo takes the same path to Stack.stop(); the bench smoke test checks a normal
    # exit leaves nothing.
    out, returncode = _run_demo_then_ctrl_c()
    assert returncode == 0, out[-6000:]
    assert_expected_end(out)
    assert "left running" in out and "tearing down" in out, out[-6000:]
    assert_nothing_left(out)


def _run_demo_then_ctrl_c() -> tuple[str, int]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--keep"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO,
        start_new_session=True, preexec_fn=as_a_background_job,  # noqa: PLW1509
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C here stops everything." in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines) + out, proc.returncode


def assert_expected_end(out: str) -> None:
    assert "demo finished: as expected" in out
    # The chart was installed and its dispatcher pod ran.
    assert "helm install autoreduce helm/autoreduce" in out
    assert re.search(r"autoreduce-[a-z0-9]+-[a-z0-9]+\s+1/1\s+Running\s+\d+\s+\S+\s+\S+\s+node-1",
                     out), out
    # `helm test`: the canary's one run came back Skipped (and shows up as a run).
    assert "Phase:          Succeeded" in out, out
    assert re.search(r"canary passed: ReductionSkipped (came back|posted)", out), out
    assert len(re.findall(r"ReductionSkipped\s+CANARY\s+run \d+", out)) == 1, out
    # While running: one WISH run reducing, the others of its RB waiting for it.
    assert re.search(r"WISH\s+1920001\s+44002\s+0\s+\S+\s+1\s+red-wish-44002-v0-\S+\s+"
                     r"RB held by red-wish-44001-v0-", out), out
    # explain tells the waiting run's story: it waited for its RB, then reduced.
    assert "WISH run 44002: 1 version(s)" in out, out
    assert re.search(r"Waiting: waiting for RB 1920001: held by Job red-wish-44001-v0-", out), out
    assert re.search(r"runner\s+v0 pod \w+\s+posted ReductionComplete", out), out
    # Every outcome, one each.
    for line in (r"ReductionComplete\s+WISH\s+run 44001",
                 r"ReductionComplete\s+WISH\s+run 44002",
                 r"ReductionError\s+LET\s+run 9001\s+Error in user reduction script: "
                 r"ZeroDivisionError",
                 r"ReductionError\s+WISH\s+run 44003\s+Run cancelled while waiting",
                 r"ReductionError\s+MARI\s+run 25581\s+invalid message"):
        assert len(re.findall(line, out)) == 1, (line, out)
    # How to look: CLI status, dead letters, kubectl jobs/describe/logs, metrics.
    assert "RECENTLY FINISHED (4 of 4)" in out  # the canary's run among them
    assert re.search(r"ID:\S+\s+\S+\s+MARI\s+25581\s+invalid message", out)
    assert "Waiting " in out and "held by Job red-wish-44001-v0-" in out
    assert "step 6/6" in out and "ReductionComplete posted" in out
    # The real kubelet ran the runner image (its Events), metrics came through a
    # port-forward (the pod has its own network namespace).
    assert re.search(r"kubelet\s+.*Container image \"autoreduce-runner:0\.1\.0\" already present",
                     out), out
    assert re.search(r"kubectl port-forward -n autoreduce deploy/autoreduce \d+:http", out), out
    assert "autoreduce_runs_received_total 7.0" in out  # 6 + the canary
    assert "autoreduce_runs_accepted_total 5.0" in out


def assert_nothing_left(out: str) -> None:
    """None of the demo's processes, mounts, namespaces, cgroups or folders remain."""
    work = re.search(r"working in (\S+)", out)
    stack = re.search(r"stack (\w+) up in", out)
    assert work and stack, out
    assert leftovers(Path(work.group(1)), stack.group(1)) == []

"""The benchmark command runs end to end (tiny sizes) and writes every section.

Benchmarks report, they never fail on a number: this test checks only that
``python -m bench`` completes on the real stack and that its results file has
every section. No timing thresholds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import SECTIONS
from devstack.product import PYTHONPATH, REPO
from devstack.stack import leftovers

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_bench_tiny_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True, text=True, timeout=880, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # A stack stopped at a normal exit leaves nothing: no process, mount, namespace,
    # cgroup, nor its folder (the demo and devstack tests cover Ctrl-C and SIGTERM).
    (kept,) = re.findall(r"stack state in (\S+)", done.stdout)
    (stack_id,) = re.findall(r"\[bench\] stack (\w+) up in", done.stdout)
    assert leftovers(Path(kept), stack_id) == []
    results = json.loads((out / "latest.json").read_text())
    missing = [section for section in SECTIONS if section not in results]
    assert not missing, missing
    errors = {name: value["error"] for name, value in results.items()
              if isinstance(value, dict) and "error" in value}
    assert not errors, errors
    assert (out / "latest.md").read_text().count("TARGET") == len(results["targets"])
    # The busy cycle ran real runs on a pool that grew, each with one outcome, and
    # its picture was drawn.
    cycle = results["cycle"]
    assert cycle["outcomes"]["runs_without_exactly_one"] == [], cycle["outcomes"]
    assert cycle["max_nodes_used"] == 2 and cycle["max_pending"] >= 1, cycle["pool_events"]
    assert (out / cycle["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

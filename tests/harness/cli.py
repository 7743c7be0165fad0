"""The operator CLI as a user runs it: a child process with a dispatcher's settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from devstack.product import PYTHONPATH, REPO, DispatcherProcess


def config_of(proc: DispatcherProcess) -> Path:
    return proc.workdir / f"{proc.name}.yaml"


def cli(
    proc: DispatcherProcess, *args: str, script: bool = False, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``autoreduce ARGS --config <proc's settings>`` (``script``: the installed entry
    point, else ``python -m autoreduce_cli``), with the dispatcher's kubeconfig."""
    command = [str(Path(sys.executable).parent / "autoreduce")] if script else [
        sys.executable, "-m", "autoreduce_cli"]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "KUBECONFIG": str(proc.kubeconfig)}
    return subprocess.run(
        [*command, *args, "--config", str(config_of(proc))],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)

"""The post-process admin: plan directories, run the script supervised, publish.

Everything here returns a ``RunResult``; posting it is the caller's job, so every
path through a run ends in exactly one outcome.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from autoreduce_common.messages import Outcome, ReductionMessage
from autoreduce_common.pod_contract import OOM_KILLED, oom_retry_note

from autoreduce_runner.config import RunnerSettings
from autoreduce_runner.oom import MemorySample, oom_verdict, read_sample
from autoreduce_runner.outputs import (
    PermissionProblem,
    ensure_writable_dir,
    is_permission_error,
    publish,
    resolve_within,
)
from autoreduce_runner.paths import (
    Layout,
    PathError,
    RunFields,
    map_data_path,
    parse_cycle,
    plan_layout,
)
from autoreduce_runner.report import RunResult, error
from autoreduce_runner.supervise import BoundedCapture, Supervised, supervise

log = logging.getLogger(__name__)

CHILD_MODULE = "autoreduce_runner.child"
# Environment the script must not see (the broker credentials are the admin's).
_HIDDEN_ENV_PREFIXES = ("AUTOREDUCE_BROKER", "AUTOREDUCE_POSTER")


@dataclass(frozen=True)
class Plan:
    """A validated run: resolved input and directories."""

    input_file: str | list[str]
    run_numbers: list[int]
    layout: Layout  # final_output and log_dir resolved within the output roots


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def plan_run(*, settings: RunnerSettings, message: ReductionMessage) -> Plan:
    """Map and check the data path(s), render and check the directories."""
    data = [str(item) for item in _as_list(message.data)]
    mapped = [map_data_path(item, mappings=settings.path_mappings) for item in data]
    resolved = [
        resolve_within(item, roots=settings.archive_roots, what="data path") for item in mapped
    ]
    for original, final in zip(data, resolved, strict=True):
        log.info("data %s -> %s", original, final)
    fields = RunFields(
        facility=message.facility,
        instrument=str(message.instrument),
        cycle=parse_cycle(mapped[0]),
        rb_number=str(message.rb_number),
        run_number=message.first_run,
        run_version=message.run_version,
    )
    dirs = settings.directories
    layout = plan_layout(
        fields=fields, output=dirs.output, flat_output_template=dirs.flat_output,
        version_folder=dirs.version_folder, log=dirs.log, log_file=dirs.log_file,
        flat_output=bool(message.flat_output), overwrite=bool(message.overwrite),
    )
    roots = settings.output_roots
    layout = Layout(
        final_output=resolve_within(layout.final_output, roots=roots, what="output directory"),
        log_dir=resolve_within(layout.log_dir, roots=roots, what="log directory"),
        log_file=layout.log_file,
    )
    log.info("output -> %s; log -> %s", layout.final_output, layout.log_dir)
    return Plan(
        input_file=resolved if isinstance(message.data, list) else resolved[0],
        run_numbers=[int(run) for run in _as_list(message.run_number)],
        layout=layout,
    )


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The script's environment: ours minus the broker settings, unbuffered Python."""
    env = {k: v for k, v in environ.items() if not k.startswith(_HIDDEN_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def reduce(
    *, settings: RunnerSettings, message: ReductionMessage, stop: threading.Event,
    tee: BinaryIO | None,
) -> RunResult:
    """Steps 3-7 of the contract for an already validated message."""
    try:
        plan = plan_run(settings=settings, message=message)
        for path in (str(settings.directories.temp_root), plan.layout.log_dir,
                     posixpath.dirname(plan.layout.final_output)):
            ensure_writable_dir(path)
    except PathError as problem:
        return error(f"Refused: {problem}")
    except PermissionProblem as problem:
        return error(f"Permission problem: {problem}", retry_in=settings.permission_retry_s)
    except OSError as problem:
        return error(f"Cannot prepare the run's directories: {problem}")
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=settings.directories.temp_root))
    try:
        return _reduce_in(scratch=scratch, settings=settings, message=message, plan=plan,
                          stop=stop, tee=tee)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_job(*, scratch: Path, message: ReductionMessage, plan: Plan) -> tuple[Path, Path]:
    script_dir = scratch / "script"
    script_dir.mkdir()
    script_path = script_dir / "reduce.py"
    script_path.write_text(str(message.reduction_script), encoding="utf-8")
    (scratch / "output").mkdir()
    arguments = message.reduction_arguments or {}
    job = {
        "script_path": str(script_path),
        "standard_vars": arguments.get("standard_vars") or {},
        "advanced_vars": arguments.get("advanced_vars") or {},
        "run_numbers": plan.run_numbers,
        "input_file": plan.input_file,
        "output_dir": str(scratch / "output"),
        "result_file": str(scratch / "result.json"),
    }
    job_path = scratch / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    return job_path, script_dir


def _reduce_in(
    *, scratch: Path, settings: RunnerSettings, message: ReductionMessage, plan: Plan,
    stop: threading.Event, tee: BinaryIO | None,
) -> RunResult:
    job_path, script_dir = _write_job(scratch=scratch, message=message, plan=plan)
    capture = BoundedCapture(limit=settings.log_caps.reduction_log * 4)
    log_path = Path(plan.layout.log_dir) / plan.layout.log_file
    log.info("running reduce.py (timeout %g s); script log %s", settings.timeout_s, log_path)
    memory_before = read_sample(root=settings.cgroup_root)
    with log_path.open("ab") as log_file:
        supervised = supervise(
            argv=[sys.executable, "-m", CHILD_MODULE, str(job_path)],
            env=child_env(os.environ), cwd=str(script_dir), timeout_s=settings.timeout_s,
            kill_grace_s=settings.kill_grace_s, tee=tee, log_file=log_file, capture=capture,
            stop=stop,
        )
    log.info("script process ended: status %s after %.1f s", supervised.returncode,
             supervised.duration_s)
    memory = (memory_before, read_sample(root=settings.cgroup_root))
    reduction_log = capture.text(limit_chars=settings.log_caps.reduction_log)
    result = _conclude(scratch=scratch, settings=settings, plan=plan, supervised=supervised,
                       memory=memory)
    return dataclasses.replace(result, reduction_log=reduction_log)


def _crash_text(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"Error in user reduction script: Signal - the script's process was killed by {name}"
    return (
        "Error in user reduction script: ProcessExit - the script's process exited with "
        f"status {returncode} before main() returned (os._exit or a crash)"
    )


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def _crashed(*, returncode: int, memory: tuple[MemorySample, MemorySample],
             oom_retry_limit: str) -> RunResult:
    before, after = memory
    out_of_memory = oom_verdict(returncode=returncode, before=before, after=after)
    if out_of_memory is not None:
        log.info("the memory cgroup counted an OOM kill during the run (%s -> %s)",
                 before.oom_kills, after.oom_kills)
        note = oom_retry_note(limit=oom_retry_limit) if oom_retry_limit else ""
        return error(out_of_memory + note, reason=OOM_KILLED)
    return error(_crash_text(returncode))


def _conclude(
    *, scratch: Path, settings: RunnerSettings, plan: Plan, supervised: Supervised,
    memory: tuple[MemorySample, MemorySample],
) -> RunResult:
    if supervised.stopped:
        return error("Reduction stopped: the runner was told to terminate (deadline, "
                     "cancellation or eviction); the script's processes were killed")
    if supervised.timed_out:
        return error(f"Reduction timed out after {settings.timeout_s:g} s; "
                     "the script's processes were killed")
    result = _read_result(scratch / "result.json")
    if result is None:
        return _crashed(returncode=supervised.returncode, memory=memory,
                        oom_retry_limit=settings.oom_retry_limit)
    return _from_result(result, scratch=scratch, settings=settings, plan=plan)


def _from_result(
    result: dict[str, Any], *, scratch: Path, settings: RunnerSettings, plan: Plan
) -> RunResult:
    status = result.get("status")
    if status == "skipped":
        return RunResult(outcome=Outcome.SKIPPED, message=str(result.get("reason", "")))
    if status == "error":
        return error(str(result.get("message", "Error in user reduction script")))
    dirs = result.get("output_dirs")
    if status != "complete" or not isinstance(dirs, list) or not all(
        isinstance(item, str) for item in dirs
    ):
        return error("Error in user reduction script: the script process wrote a "
                     "malformed result file")
    return _publish(scratch=scratch, settings=settings, plan=plan, returned=dirs)


def _destinations(*, scratch: Path, settings: RunnerSettings, plan: Plan,
                  returned: list[str]) -> list[Path]:
    temp_output = os.path.realpath(scratch / "output")
    ordered = [plan.layout.final_output]
    for item in returned:
        if item.startswith("/") and os.path.realpath(item) == temp_output:
            continue  # main() returned its own output_dir: nothing extra to copy
        resolved = resolve_within(
            item, roots=settings.output_roots, what="output directory returned by main()"
        )
        if resolved not in ordered:
            ordered.append(resolved)
    return [Path(item) for item in ordered]


def _publish(*, scratch: Path, settings: RunnerSettings, plan: Plan,
             returned: list[str]) -> RunResult:
    try:
        destinations = _destinations(scratch=scratch, settings=settings, plan=plan,
                                     returned=returned)
    except PathError as problem:
        return error(f"Refused: {problem}; no output was written")
    try:
        copied = publish(source=scratch / "output", destinations=destinations)
    except OSError as problem:
        if is_permission_error(problem):
            return error(f"Permission problem while copying output: {problem}",
                         retry_in=settings.permission_retry_s)
        return error(f"Could not copy the output: {problem}")
    log.info("output copied to %s", ", ".join(copied))
    return RunResult(outcome=Outcome.COMPLETE, reduction_data=copied)

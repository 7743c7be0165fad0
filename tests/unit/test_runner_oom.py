"""An OOM kill of the script's child reads "out of memory", from the memory cgroup.

The verdict is pure (texts in, message out); the reader is tried on fake cgroup roots
laid out as a container sees them on cgroup v1 and v2; and one run of the admin, with
a real child process, shows the wiring: a SIGKILL with a new OOM kill counted during
the run is reported as out of memory, any other SIGKILL as a signal.
"""

from __future__ import annotations

import signal
import textwrap
import threading
from pathlib import Path

import pytest
from autoreduce_common.messages import validate
from autoreduce_common.pod_contract import (
    OOM_KILLED,
    out_of_memory_message,
    quantity_bytes,
    render_memory,
)
from autoreduce_runner.admin import reduce
from autoreduce_runner.config import RunnerSettings
from autoreduce_runner.oom import MemorySample, oom_verdict, parse_sample, read_sample

from dispatcher.failures import classify

REPO = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL
MI_128 = 128 * 1024 * 1024
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n"
V2_EVENTS = "low 0\nhigh 0\nmax {n}\noom {n}\noom_kill {n}\noom_group_kill 0\n"
V1_UNLIMITED = "9223372036854771712\n"
SIGNAL_TEXT = ("Error in user reduction script: Signal - the script's process was killed by "
               "SIGKILL")
OOM_128 = "Reduction ran out of memory (limit 128Mi) and was killed"


def v1_root(root: Path, *, oom_kills: int, limit: str = f"{MI_128}\n") -> Path:
    memory = root / "memory"
    memory.mkdir(parents=True, exist_ok=True)
    (memory / "memory.oom_control").write_text(V1_OOM_CONTROL.format(n=oom_kills))
    (memory / "memory.limit_in_bytes").write_text(limit)
    return root


def v2_root(root: Path, *, oom_kills: int, limit: str = f"{MI_128}\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.events").write_text(V2_EVENTS.format(n=oom_kills))
    (root / "memory.max").write_text(limit)
    return root


# -- the pure verdict -------------------------------------------------------------------


def test_v1_texts_parse_to_a_count_and_a_limit() -> None:
    sample = parse_sample(events=V1_OOM_CONTROL.format(n=3), limit="134217728\n")
    assert sample == MemorySample(oom_kills=3, limit_bytes=MI_128)


def test_v2_texts_parse_and_max_means_no_limit() -> None:
    assert parse_sample(events=V2_EVENTS.format(n=2), limit="max\n") == MemorySample(2, None)
    assert parse_sample(events="oom_kill 0", limit=V1_UNLIMITED) == MemorySample(0, None)


def test_a_kernel_without_the_oom_kill_line_cannot_tell() -> None:
    # Linux < 4.13 has no "oom_kill" in memory.oom_control.
    sample = parse_sample(events="oom_kill_disable 0\nunder_oom 0\n", limit="134217728")
    assert sample.oom_kills is None
    assert oom_verdict(returncode=KILLED, before=sample, after=sample) is None


def test_a_sigkill_with_a_new_oom_kill_is_out_of_memory() -> None:
    before, after = MemorySample(0, MI_128), MemorySample(1, MI_128)
    assert oom_verdict(returncode=KILLED, before=before, after=after) == OOM_128


def test_an_oom_kill_before_the_run_does_not_relabel_a_sigkill() -> None:
    before = after = MemorySample(oom_kills=1, limit_bytes=MI_128)
    assert oom_verdict(returncode=KILLED, before=before, after=after) is None


def test_a_new_oom_kill_does_not_relabel_other_endings() -> None:
    before, after = MemorySample(0, MI_128), MemorySample(1, MI_128)
    for returncode in (-signal.SIGSEGV, -signal.SIGTERM, 1, 0):
        assert oom_verdict(returncode=returncode, before=before, after=after) is None


def test_nothing_readable_never_claims_oom() -> None:
    assert oom_verdict(returncode=KILLED, before=MemorySample(), after=MemorySample()) is None
    assert oom_verdict(returncode=KILLED, before=MemorySample(), after=MemorySample(1)) is None


def test_an_oom_with_no_limit_says_the_limit_is_unknown() -> None:
    verdict = oom_verdict(returncode=KILLED, before=MemorySample(0), after=MemorySample(1))
    assert verdict == out_of_memory_message(limit="?")


@pytest.mark.parametrize(("count", "text"), [
    (MI_128, "128Mi"), (256 << 20, "256Mi"), (8 << 30, "8Gi"), (2048 << 20, "2Gi"),
    (512 << 10, "512Ki"), (1_000_000_000, "953.7Mi"), (999_997_440, "953.7Mi"),
    (10_000_000_000, "9.3Gi"), (1000, "1000"),
])  # fmt: skip
def test_limits_render_as_binary_quantities(count: int, text: str) -> None:
    assert render_memory(count) == text


@pytest.mark.parametrize("written", ["128Mi", "256Mi", "8Gi", "1G", "500M", "1e9", "1.5Gi"])
def test_the_dispatcher_and_the_runner_name_the_same_limit_alike(written: str) -> None:
    """The dispatcher renders the Job's quantity; the runner, the cgroup's bytes (cgroup
    v1 rounds them down to whole 4 KiB pages)."""
    count = quantity_bytes(written)
    assert count is not None
    job = {"spec": {"template": {"spec": {"containers": [
        {"name": "runner", "resources": {"limits": {"memory": written}}}]}}}}  # fmt: skip
    pod = {"status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}  # fmt: skip
    dispatcher_says = classify(job=job, pods=[pod], log_tail="").message
    paged = str(count // 4096 * 4096)
    runner_says = oom_verdict(returncode=KILLED, before=parse_sample(events="oom_kill 0",
                              limit=paged), after=parse_sample(events="oom_kill 1", limit=paged))
    assert dispatcher_says == runner_says


def test_a_quantity_written_as_is_is_kept_when_it_cannot_be_read() -> None:
    job = {"spec": {"template": {"spec": {"containers": [
        {"resources": {"limits": {"memory": "lots"}}}]}}}}  # fmt: skip
    pod = {"status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}  # fmt: skip
    assert classify(job=job, pods=[pod], log_tail="").message == out_of_memory_message(
        limit="lots")


# -- the reader, on fake cgroup roots ---------------------------------------------------


def test_the_reader_finds_cgroup_v1(tmp_path: Path) -> None:
    assert read_sample(root=v1_root(tmp_path, oom_kills=4)) == MemorySample(4, MI_128)


def test_the_reader_finds_cgroup_v2(tmp_path: Path) -> None:
    assert read_sample(root=v2_root(tmp_path, oom_kills=1)) == MemorySample(1, MI_128)


def test_the_reader_with_no_cgroup_says_nothing(tmp_path: Path) -> None:
    assert read_sample(root=tmp_path / "absent") == MemorySample()


def test_the_reader_with_events_but_no_limit_file(tmp_path: Path) -> None:
    v2_root(tmp_path, oom_kills=2)
    (tmp_path / "memory.max").unlink()
    assert read_sample(root=tmp_path) == MemorySample(2, None)


# -- one run of the admin, a real child, a fake cgroup ----------------------------------

# The script plays the kernel: it counts an OOM kill in the fake cgroup (or not), then
# dies by SIGKILL, as an OOM-killed process does.
KILLED_SCRIPT = """
import os, pathlib, signal
def main(input_file, output_dir):
    if {count}:
        path = pathlib.Path({events!r})
        path.write_text(path.read_text().replace("oom_kill 0", "oom_kill 1"))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, cgroup: Path,
               events: Path, count: bool, oom_retry_limit: str = "") -> str | None:  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'common'}:{REPO / 'runner-image'}")
    archive, output = tmp_path / "archive", tmp_path / "output"
    (archive / "cycle_23_4").mkdir(parents=True)
    (archive / "cycle_23_4" / "WISH1.nxs").write_text("data")
    output.mkdir()
    settings = RunnerSettings(
        archive_roots=[archive], output_roots=[output], cgroup_root=cgroup, path_mappings=[],
        oom_retry_limit=oom_retry_limit,
        directories={"output": f"{output}/{{run_number}}", "flat_output": f"{output}/flat",
                     "log": f"{output}/log", "temp_root": tmp_path / "temp"},
    )  # fmt: skip
    script = textwrap.dedent(KILLED_SCRIPT.format(count=count, events=str(events)))
    message = validate({
        "data": str(archive / "cycle_23_4" / "WISH1.nxs"), "facility": "ISIS",
        "instrument": "WISH", "rb_number": 1234567, "run_number": 1, "run_version": 0,
        "reduction_script": script, "reduction_arguments": {},
    })  # fmt: skip
    result = reduce(settings=settings, message=message, stop=threading.Event(), tee=None)
    assert result.reason == (OOM_KILLED if count else "")
    return result.message


def test_the_admin_reports_an_oom_killed_script_as_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cgroup = v1_root(tmp_path / "cgroup", oom_kills=0)
    events = cgroup / "memory" / "memory.oom_control"
    assert run_killed(tmp_path, monkeypatch, cgroup=cgroup, events=events, count=True) == OOM_128


def test_the_admin_says_when_an_oom_killed_run_is_retried_bigger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Job told the runner (AUTOREDUCE_OOM_RETRY_LIMIT) what the retry would get.
    cgroup = v1_root(tmp_path / "cgroup", oom_kills=0)
    said = run_killed(tmp_path, monkeypatch, cgroup=cgroup, count=True, oom_retry_limit="256Mi",
                      events=cgroup / "memory" / "memory.oom_control")  # fmt: skip
    assert said == OOM_128 + "; it is retried as its next version with a memory limit of 256Mi"


def test_the_admin_reports_a_sigkill_without_an_oom_kill_as_a_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cgroup = v2_root(tmp_path / "cgroup", oom_kills=0)
    events = cgroup / "memory.events"
    said = run_killed(tmp_path, monkeypatch, cgroup=cgroup, events=events, count=False)
    assert said == SIGNAL_TEXT


def test_the_admin_without_a_cgroup_keeps_the_signal_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = run_killed(tmp_path, monkeypatch, cgroup=tmp_path / "none",
                      events=tmp_path / "none" / "memory.events", count=False)  # fmt: skip
    assert said == SIGNAL_TEXT

"""The runner as a real local process against the real broker (no mocks).

Each test writes a run's message to a file, runs ``python -m autoreduce_runner``
with the environment a Job would give it (queues of the test's own, a temporary
archive and output tree), then checks the exit code, the termination message,
the files and what arrived on the outcome queues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from autoreduce_common.broker_settings import BrokerSettings

from devstack.activemq import free_port
from devstack.product import EVERY_OUTPUT_LINES, EVERY_OUTPUT_SCRIPT
from devstack.queues import QueueReader
from tests.harness.checks import only_outcome

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(str(p) for p in (ROOT, ROOT / "common", ROOT / "runner-image"))
UNC_DATA = "\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\WISH00012345.nxs"

WEB_VAR_SCRIPT = """
import os, sys, json
sys.path.append(os.path.dirname(os.path.realpath(__file__)))
import reduce_vars as web_var

# Read at import time: the overrides must already be there.
AT_IMPORT = dict(web_var.standard_vars)

def main(input_file, output_dir):
    print("standard_vars", json.dumps(web_var.standard_vars, sort_keys=True))
    print("advanced_vars", json.dumps(web_var.advanced_vars, sort_keys=True))
    with open(os.path.join(output_dir, "reduced.json"), "w") as f:
        json.dump({"input": input_file, "at_import": AT_IMPORT,
                   "standard": web_var.standard_vars, "advanced": web_var.advanced_vars}, f)
    os.makedirs(os.path.join(output_dir, "sub"))
    with open(os.path.join(output_dir, "sub", "part.txt"), "w") as f:
        f.write("part")
    return EXTRA
"""


@dataclass
class Site:
    """A fake facility: archive, output tree, scratch, runner config."""

    root: Path
    archive: Path
    output: Path
    temp: Path
    data_file: Path
    config: Path
    termination: Path

    def final_dir(self, run: int = 12345, version: int = 0) -> Path:
        return (
            self.output
            / "WISH/RBNumber/RB1234567/autoreduced"
            / str(run)
            / f"run-version-{version}"
        )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    termination: dict[str, Any]


def _config(
    site_root: Path, archive: Path, output: Path, temp: Path, **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "path_mappings": [{"windows": "\\\\isis\\inst$\\", "linux": f"{archive}/"}],
        "archive_roots": [str(archive)],
        "output_roots": [str(output)],
        "directories": {
            "output": f"{output}/{{instrument}}/RBNumber/RB{{rb_number}}/autoreduced/"
            "{run_number}",
            "flat_output": f"{output}/{{instrument}}/RBNumber/RB{{rb_number}}/autoreduced",
            "log": f"{output}/{{instrument}}/RBNumber/RB{{rb_number}}/autoreduced/reduction_log",
            "temp_root": str(temp),
        },
        "timeout_s": 60,
        "broker_connect_timeout_s": 5,
    }
    config.update(extra)
    return config


@pytest.fixture
def site(tmp_path: Path) -> Site:
    archive, output, temp = tmp_path / "archive", tmp_path / "output", tmp_path / "temp"
    data_dir = archive / "NDXWISH/Instrument/data/cycle_23_4"
    data_dir.mkdir(parents=True)
    data_file = data_dir / "WISH00012345.nxs"
    data_file.write_text("raw data")
    output.mkdir()
    config = tmp_path / "runner.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, archive, output, temp)))
    return Site(
        root=tmp_path,
        archive=archive,
        output=output,
        temp=temp,
        data_file=data_file,
        config=config,
        termination=tmp_path / "termination-log",
    )


def set_config(site: Site, **extra: Any) -> None:
    site.config.write_text(
        yaml.safe_dump(_config(site.root, site.archive, site.output, site.temp, **extra))
    )


def run_message(script: str, **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "data": UNC_DATA,
        "facility": "ISIS",
        "instrument": "WISH",
        "rb_number": 1234567,
        "run_number": 12345,
        "run_version": 0,
        "reduction_script": script,
        "reduction_arguments": {
            "standard_vars": {"sum_runs": True, "mask": "m.xml"},
            "advanced_vars": {"bins": [1, 2, 3]},
        },
        "started_by": 0,
        "description": "",
    }
    message.update(fields)
    return message


def runner_env(site: Site, settings: BrokerSettings, message_file: Path) -> dict[str, str]:
    password_file = site.root / "broker-password"
    password_file.write_text(settings.password.get_secret_value())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": PYTHONPATH,
        "AUTOREDUCE_MESSAGE_FILE": str(message_file),
        "AUTOREDUCE_RUNNER_CONFIG": str(site.config),
        "AUTOREDUCE_TERMINATION_LOG": str(site.termination),
        "AUTOREDUCE_BROKER__HOSTS": ",".join(settings.hosts),
        "AUTOREDUCE_BROKER__USERNAME": settings.username,
        "AUTOREDUCE_BROKER__PASSWORD_FILE": str(password_file),
        "AUTOREDUCE_BROKER__HEARTBEAT_MS": "2000",
        "AUTOREDUCE_BROKER__RECONNECT_INITIAL_S": "0.2",
        "AUTOREDUCE_BROKER__RECONNECT_MAX_S": "1",
    }
    for name, queue in settings.queues.model_dump().items():
        env[f"AUTOREDUCE_BROKER__QUEUES__{name.upper()}"] = queue
    if settings.tls.enabled:
        env["AUTOREDUCE_BROKER__TLS__ENABLED"] = "true"
        if settings.tls.ca_file is not None:
            env["AUTOREDUCE_BROKER__TLS__CA_FILE"] = str(settings.tls.ca_file)
    return env


def run_runner(
    site: Site,
    settings: BrokerSettings,
    message: dict[str, Any] | str,
    *,
    prefix: list[str] | None = None,
    env_extra: dict[str, str] | None = None,
    timeout: float = 120,
) -> Ran:
    message_file = site.root / "message.json"
    message_file.write_text(message if isinstance(message, str) else json.dumps(message))
    env = runner_env(site, settings, message_file)
    env.update(env_extra or {})
    site.termination.unlink(missing_ok=True)
    proc = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "autoreduce_runner"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=site.root,
        check=False,  # the exit code is what we test
    )
    termination = json.loads(site.termination.read_text()) if site.termination.exists() else {}
    return Ran(proc.returncode, proc.stdout, proc.stderr, termination)


def error_of(
    reader: QueueReader, settings: BrokerSettings, ran: Ran, *, started: bool = True
) -> dict[str, Any]:
    body = only_outcome(reader, settings, settings.queues.error)
    assert ran.returncode == 1, ran.stderr[-3000:]
    assert ran.termination["outcome"] == "Error"
    assert ran.termination["posted"] is True
    assert ran.termination["retry_in"] is None
    assert body["retry_in"] is None
    assert len(reader.bodies(settings.queues.started)) == (1 if started else 0)
    return body


# -- the happy paths ----------------------------------------------------------------


def test_web_variables_applied_output_copied_and_complete_posted(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    extra = site.output / "extra" / "copy"
    script = WEB_VAR_SCRIPT.replace("EXTRA", repr(str(extra)))
    message = run_message(
        script,
        legacy_only={"nested": [1, "x"]},
        retry_in=21600,
        message="stale error from the previous attempt",
    )
    ran = run_runner(site, broker_settings, message)
    assert ran.returncode == 0, ran.stderr[-3000:]

    final = site.final_dir()
    reduced = json.loads((final / "reduced.json").read_text())
    overrides = {"sum_runs": True, "mask": "m.xml"}
    assert reduced["standard"] == overrides
    assert reduced["at_import"] == overrides
    assert reduced["advanced"] == {"bins": [1, 2, 3]}
    assert reduced["input"] == str(site.data_file)
    assert (final / "sub" / "part.txt").read_text() == "part"
    assert (extra / "reduced.json").exists() and (extra / "sub" / "part.txt").exists()
    # No staging directories or scratch left behind.
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]
    assert list(site.temp.iterdir()) == []

    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    started = reader.bodies(broker_settings.queues.started)
    assert len(started) == 1 and started[0]["run_number"] == 12345
    assert body["reduction_data"] == [str(final), str(extra)]
    assert 'standard_vars {"mask": "m.xml", "sum_runs": true}' in body["reduction_log"]
    assert "ReductionStarted posted" in body["admin_log"]
    assert body["message"] is None and body["retry_in"] is None
    # The original object survives: unknown fields, the producer's types.
    assert body["legacy_only"] == {"nested": [1, "x"]}
    assert body["rb_number"] == 1234567 and body["data"] == UNC_DATA
    assert body["reduction_script"] == script
    # The script's output went live to the runner's stdout and into the log file.
    assert 'standard_vars {"mask": "m.xml", "sum_runs": true}' in ran.stdout
    log_file = (
        site.output
        / "WISH/RBNumber/RB1234567/autoreduced/reduction_log/RB1234567_Run12345_v0_Script.out"
    )
    assert "advanced_vars" in log_file.read_text()
    assert ran.termination == {
        "stage": "posted",
        "outcome": "Complete",
        "posted": True,
        "retry_in": None,
        "reason": "",
        "message": "",  # the outcome's own message field: none on success
        "reduction_data": [str(final), str(extra)],
    }


def test_skip_runs_is_reported_as_skipped_not_error(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    script = (
        "SKIP_RUNS = [999, '12345']\n"
        "def main(input_file, output_dir):\n    raise RuntimeError('must not run')\n"
    )
    ran = run_runner(site, broker_settings, run_message(script, run_number="012345"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    body = only_outcome(reader, broker_settings, broker_settings.queues.skipped)
    assert "SKIP_RUNS" in body["message"]
    assert body["run_number"] == "012345"
    assert ran.termination["outcome"] == "Skipped" and ran.termination["posted"] is True
    assert not site.final_dir().exists()


def test_overwrite_and_flat_output_layouts(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    script = (
        "def main(input_file, output_dir):\n    open(output_dir + '/new.txt', 'w').write('new')\n"
    )
    flat = site.output / "WISH/RBNumber/RB1234567/autoreduced"
    flat.mkdir(parents=True)
    (flat / "earlier.txt").write_text("kept")
    (flat / "new.txt").write_text("old")
    ran = run_runner(site, broker_settings, run_message(script, flat_output=True, overwrite=True))
    assert ran.returncode == 0, ran.stderr[-3000:]
    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    assert body["reduction_data"] == [str(flat)]
    assert (flat / "new.txt").read_text() == "new"
    assert (flat / "earlier.txt").read_text() == "kept"


def test_batch_run_gets_every_data_file(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    second = site.data_file.with_name("WISH00012346.nxs")
    second.write_text("more")
    script = (
        "import json\n"
        "def main(input_file, output_dir):\n"
        "    open(output_dir + '/inputs.json', 'w').write(json.dumps(input_file))\n"
    )
    message = run_message(script, data=[UNC_DATA, str(second)], run_number=[12346, 12345])
    ran = run_runner(site, broker_settings, message)
    assert ran.returncode == 0, ran.stderr[-3000:]
    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    final = site.final_dir(run=12345)  # a batch is named by its lowest run
    assert body["reduction_data"] == [str(final)]
    assert json.loads((final / "inputs.json").read_text()) == [str(site.data_file), str(second)]


def test_reduction_arguments_that_are_not_objects_are_refused(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    message = run_message("def main(input_file, output_dir): pass\n",
                          reduction_arguments={"standard_vars": [1, 2]})
    ran = run_runner(site, broker_settings, message)
    body = error_of(reader, broker_settings, ran, started=False)
    assert body["message"].startswith("Invalid reduction message: reduction_arguments")


# -- output capture ------------------------------------------------------------------


def test_c_level_and_subprocess_output_is_captured_and_teed(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    ran = run_runner(site, broker_settings, run_message(EVERY_OUTPUT_SCRIPT))
    assert ran.returncode == 0, ran.stderr[-3000:]
    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    lines = EVERY_OUTPUT_LINES
    for line in lines:
        assert line in body["reduction_log"], body["reduction_log"]
        assert line in ran.stdout, ran.stdout
    # One pipe for both fds: the order is the order of writing.
    positions = [body["reduction_log"].index(line) for line in lines]
    assert positions == sorted(positions)


def test_huge_output_is_bounded_in_the_message(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    set_config(site, log_caps={"reduction_log": 5000, "admin_log": 2000})
    script = textwrap.dedent("""
        import os
        def main(input_file, output_dir):
            print('FIRST')
            os.write(1, b'x' * 3_000_000)
            print('\\nLAST')
    """).lstrip()
    ran = run_runner(site, broker_settings, run_message(script))
    assert ran.returncode == 0, ran.stderr[-3000:]
    body = only_outcome(reader, broker_settings, broker_settings.queues.complete)
    log = body["reduction_log"]
    assert len(log) <= 5000 and len(body["admin_log"]) <= 2000
    assert log.startswith("FIRST") and log.rstrip().endswith("LAST")
    assert "cut" in log


# -- bad input: each ends in one ReductionError with a clear message -----------------


def test_missing_fields_error_without_started(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    message = run_message("def main(input_file, output_dir): pass")
    del message["reduction_script"]
    del message["data"]
    ran = run_runner(site, broker_settings, message)
    body = error_of(reader, broker_settings, ran, started=False)
    assert "missing required field(s): data, reduction_script" in body["message"]
    assert body["started_by"] == 0  # echoed back


SCRIPT_FAULTS = {
    "syntax": (
        "def main(input_file, output_dir)\n    pass\n",
        "Error in user reduction script: SyntaxError - ",
    ),
    "no-main": (
        "X = 1\n",
        "Error in user reduction script: AttributeError - reduce.py has no function main",
    ),
    "signature": (
        "def main(data):\n    pass\n",
        "Error in user reduction script: TypeError - main(data) cannot be called as "
        "main(input_file=..., output_dir=...)",
    ),
    "raises": (
        "def main(input_file, output_dir):\n    raise ValueError('bad mask file')\n",
        "Error in user reduction script: ValueError - bad mask file",
    ),
    "sys-exit": (
        "import sys\ndef main(input_file, output_dir):\n    sys.exit(3)\n",
        "Error in user reduction script: SystemExit - the script called sys.exit(3) in main()",
    ),
    "sys-exit-at-import": (
        "import sys\nsys.exit(0)\n",
        "Error in user reduction script: SystemExit - the script called sys.exit(0) while loading",
    ),
    "os-exit": (
        "import os\ndef main(input_file, output_dir):\n    os._exit(7)\n",
        "Error in user reduction script: ProcessExit - the script's process exited with status 7",
    ),
    "segfault": (
        "import ctypes\ndef main(input_file, output_dir):\n    ctypes.string_at(0)\n",
        "Error in user reduction script: Signal - the script's process was killed by SIGSEGV",
    ),
    "bad-return": (
        "def main(input_file, output_dir):\n    return 42\n",
        "Error in user reduction script: TypeError - main() returned int; expected a "
        "directory path (str) or a list of them",
    ),
    "bad-return-list": (
        "def main(input_file, output_dir):\n    return ['/x', None]\n",
        "Error in user reduction script: TypeError - main() returned a list holding NoneType",
    ),
}


@pytest.mark.parametrize("case", sorted(SCRIPT_FAULTS))
def test_script_faults_end_in_reduction_error(
    case: str, site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    script, expected = SCRIPT_FAULTS[case]
    ran = run_runner(site, broker_settings, run_message(script))
    body = error_of(reader, broker_settings, ran)
    assert body["message"].startswith(expected), body["message"]
    assert ran.termination["message"] == body["message"]
    assert body["reduction_data"] == []
    assert not site.final_dir().exists()


@pytest.mark.parametrize("kind", ["outside", "dotdot", "symlink", "unmapped-unc"])
def test_data_outside_the_archive_is_refused_and_never_read(
    kind: str, site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    secret = site.root / "secret.nxs"
    secret.write_text("secret")
    link = site.archive / "NDXWISH/Instrument/data/cycle_23_4/link.nxs"
    link.symlink_to(secret)
    data = {
        "outside": str(secret),
        "dotdot": str(site.archive / "NDXWISH/../../secret.nxs"),
        "symlink": "\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\link.nxs",
        "unmapped-unc": "\\\\otherhost\\share\\secret.nxs",
    }[kind]
    script = "def main(input_file, output_dir):\n    print(open(input_file).read())\n"
    before = secret.stat().st_atime_ns
    ran = run_runner(site, broker_settings, run_message(script, data=data))
    body = error_of(reader, broker_settings, ran)
    assert body["message"].startswith("Refused: data path"), body["message"]
    assert "secret" not in body["reduction_log"]
    assert secret.stat().st_atime_ns == before
    assert not site.final_dir().exists()


def test_returned_output_dir_outside_the_roots_is_refused_with_no_partial_output(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    inside = site.output / "fine"
    outside = site.root / "elsewhere"
    script = (
        "def main(input_file, output_dir):\n"
        "    open(output_dir + '/out.txt', 'w').write('x')\n"
        f"    return [{str(inside)!r}, {str(outside)!r}]\n"
    )
    ran = run_runner(site, broker_settings, run_message(script))
    body = error_of(reader, broker_settings, ran)
    assert "output directory returned by main()" in body["message"]
    assert str(outside) in body["message"] and "outside the allowed roots" in body["message"]
    assert not outside.exists() and not inside.exists()
    assert not site.final_dir().exists()
    assert not [p for p in site.final_dir().parent.iterdir() if p.name.startswith(".")]


# -- timeouts, permissions, the broker -----------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_timeout_kills_the_script_and_its_children(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    set_config(site, timeout_s=3, kill_grace_s=1)
    pids = site.root / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, time
        def main(input_file, output_dir):
            child = subprocess.Popen(["sleep", "300"])
            with open({str(pids)!r}, "w") as f:
                f.write(f"{{os.getpid()}} {{child.pid}}")
            print("sleeping", flush=True)
            time.sleep(300)
    """)
    started = time.monotonic()
    ran = run_runner(site, broker_settings, run_message(script))
    assert time.monotonic() - started < 30
    body = error_of(reader, broker_settings, ran)
    assert body["message"] == "Reduction timed out after 3 s; the script's processes were killed"
    assert "sleeping" in body["reduction_log"]
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), f"process {pid} survived the timeout"


def test_sigterm_to_the_runner_stops_the_script_and_leaves_the_outcome_to_the_dispatcher(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    script = (
        "import time\ndef main(input_file, output_dir):\n"
        "    print('working', flush=True)\n    time.sleep(300)\n"
    )
    message_file = site.root / "message.json"
    message_file.write_text(json.dumps(run_message(script)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoreduce_runner"],
        env=runner_env(site, broker_settings, message_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader.wait_for(lambda seen: any(d.destination == broker_settings.queues.started for d in seen))
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    termination = json.loads(site.termination.read_text())
    # Kubernetes sent SIGTERM (deadline, eviction or cancellation): the dispatcher
    # knows which and posts the single outcome, so the runner posts none.
    assert proc.returncode == 4
    assert termination["posted"] is False
    assert "Reduction stopped" in termination["message"]
    reader.settle(2)
    assert not reader.bodies(broker_settings.queues.error)


def test_unwritable_output_is_a_permission_problem_with_retry_in(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    site.output.chmod(0o555)
    try:
        # Root ignores file modes; without CAP_DAC_OVERRIDE it behaves like a pod's user.
        ran = run_runner(
            site,
            broker_settings,
            run_message("def main(input_file, output_dir): pass\n"),
            prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"],
        )
    finally:
        site.output.chmod(0o755)
    body = only_outcome(reader, broker_settings, broker_settings.queues.error)
    assert ran.returncode == 3, ran.stderr[-3000:]
    assert body["retry_in"] == 21600
    assert body["message"].startswith("Permission problem: cannot write to"), body["message"]
    assert ran.termination == {
        "stage": "posted",
        "outcome": "Error",
        "posted": True,
        "retry_in": 21600,
        "reason": "",
        "message": body["message"],
        "reduction_data": [],
    }


def test_broker_unreachable_exits_4_and_posts_nothing(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    set_config(site, broker_connect_timeout_s=1)
    dead = broker_settings.model_copy(update={"hosts": [f"127.0.0.1:{free_port()}"]})
    marker = site.root / "ran"
    script = f"def main(input_file, output_dir):\n    open({str(marker)!r}, 'w').write('ran')\n"
    ran = run_runner(site, dead, run_message(script))
    assert ran.returncode == 4, ran.stderr[-3000:]
    assert ran.termination["outcome"] == "none" and ran.termination["posted"] is False
    assert "broker" in ran.termination["message"]
    assert not marker.exists()  # nothing ran that nobody would hear about
    reader.settle(2)
    assert reader.seen == []


def test_bad_runner_configuration_exits_2(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    set_config(site, directories={"output": "/x/{unknown_field}"})
    ran = run_runner(site, broker_settings, run_message("def main(input_file, output_dir): pass\n"))
    assert ran.returncode == 2, ran.stderr[-3000:]
    assert ran.termination["outcome"] == "none" and ran.termination["posted"] is False
    assert "unknown_field" in ran.termination["message"]
    reader.settle(1)
    assert reader.seen == []


def test_message_that_is_not_json_exits_2(
    site: Site, broker_settings: BrokerSettings, reader: QueueReader
) -> None:
    ran = run_runner(site, broker_settings, "this is not json")
    assert ran.returncode == 2
    assert ran.termination["posted"] is False

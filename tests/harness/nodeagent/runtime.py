"""Starting, watching and killing one container's process tree.

Each container runs as ``unshare -m -p -f --kill-child /bin/sh -c <preamble>``: the
shell is PID 1 of a private PID namespace (so SIGKILL of it takes every descendant
with it) inside a private mount namespace where the pod's volumes are bind-mounted
at their mount paths. The shell then runs the command (through ``setpriv`` for
runAsUser/runAsGroup) as a child, forwards SIGTERM to it (a bare command as PID 1
would ignore SIGTERM; we behave like a container with an init such as tini), and
writes the exit code to a host file.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool
    is_file: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    working_dir: str
    log_file: Path
    exit_file: Path
    run_as_user: int | None = None
    run_as_group: int | None = None
    supplemental_groups: list[int] = field(default_factory=list)
    read_only_root: bool = False
    # Host paths the image's environment lives in (the repo and its venv): they must
    # stay visible even when a volume is mounted over a parent (an emptyDir at /tmp
    # over a checkout in /tmp/...). ``stage_dir`` is where they are held meanwhile.
    keep_visible: list[str] = field(default_factory=list)
    stage_dir: Path | None = None


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def _under(path: str | Path, root: str | Path) -> bool:
    path, root = str(path), str(root).rstrip("/") or "/"
    return root == "/" or path == root or path.startswith(root + "/")


def _mount_order(mounts: list[Mount]) -> list[Mount]:
    """Parents before children, and a mount that would hide another mount's source
    (an emptyDir at /tmp over hostPath sources in /tmp) after the mounts it hides."""

    def key(m: Mount) -> tuple[bool, int]:
        shadows = any(o is not m and _under(o.source, m.target) for o in mounts)
        return (shadows, str(m.target).count("/"))

    return sorted(mounts, key=key)


def _mount_lines(spec: LaunchSpec) -> list[str]:
    lines = []
    # Mount points first, while / is still writable (they stay behind, empty, on the host).
    for m in spec.mounts:
        if m.is_file:
            parent = os.path.dirname(m.target) or "/"
            lines.append(f"/bin/mkdir -p {_q(parent)}; [ -e {_q(m.target)} ] || : > {_q(m.target)}")
        else:
            lines.append(f"/bin/mkdir -p {_q(m.target)}")
    shadowed = [
        k for k in spec.keep_visible if any(_under(k, m.target) for m in spec.mounts)
    ]
    stages = [f"{spec.stage_dir}/{i}" for i in range(len(shadowed))]
    for path, stage in zip(shadowed, stages, strict=True):
        lines.append(f"/bin/mkdir -p {_q(stage)} && /bin/mount --bind {_q(path)} {_q(stage)}")
    if spec.read_only_root:
        # / is not a bind mount, so it cannot be flipped read-only in place: stack one.
        lines.append("/bin/mount --rbind / / && /bin/mount -o remount,bind,ro /")
    for m in _mount_order(spec.mounts):
        lines.append(f"/bin/mount --bind {_q(m.source)} {_q(m.target)}")
        if m.read_only:
            lines.append(f"/bin/mount -o remount,bind,ro {_q(m.target)}")
        elif spec.read_only_root:
            # A bind taken from the read-only root inherits its flag: lift it again.
            lines.append(f"/bin/mount -o remount,bind,rw {_q(m.target)}")
    for path, stage in zip(shadowed, stages, strict=True):
        lines.append(
            f"/bin/mkdir -p {_q(path)} 2>/dev/null; /bin/mount --bind {_q(stage)} {_q(path)}"
            f" && /bin/mount -o remount,bind,ro {_q(path)} || true"
        )
    return lines


def _command(spec: LaunchSpec) -> str:
    argv = list(spec.argv)
    if spec.run_as_user is not None or spec.run_as_group is not None:
        priv = ["/usr/bin/setpriv"]
        if spec.run_as_user is not None:
            priv.append(f"--reuid={spec.run_as_user}")
        gid = spec.run_as_group if spec.run_as_group is not None else spec.run_as_user
        priv.append(f"--regid={gid}")
        if spec.supplemental_groups:
            priv.append("--groups=" + ",".join(str(g) for g in spec.supplemental_groups))
        else:
            priv.append("--clear-groups")
        argv = [*priv, "--", *argv]
    return " ".join(_q(a) for a in argv)


def preamble(spec: LaunchSpec) -> str:
    """The shell program run as PID 1 of the container's namespaces."""
    lines = [
        "set -e",
        *_mount_lines(spec),
        f"cd {_q(spec.working_dir or '/')}",
        "set +e",
        "trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT",
        # fd 0 is the exit file, opened by the agent outside the namespace: a file opened
        # for writing in here would make the read-only remount of / fail with EBUSY.
        f"{_command(spec)} </dev/null &",
        "child=$!",
        # wait returns early when a trapped signal arrives: wait again until it is gone.
        'while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done',
        'echo "$rc" >&0',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def launch(spec: LaunchSpec) -> subprocess.Popen[bytes]:
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    # One O_APPEND descriptor for stdout and stderr keeps their interleaving.
    fd = os.open(spec.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    exit_fd = os.open(spec.exit_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return subprocess.Popen(
            ["/usr/bin/unshare", "-m", "-p", "-f", "--kill-child", "--propagation", "private",
             "/bin/sh", "-c", preamble(spec)],
            stdin=exit_fd,
            stdout=fd,
            stderr=fd,
            env=spec.env,
            cwd="/",
            start_new_session=True,  # its own process group: killpg reaches the whole tree
        )  # fmt: skip
    finally:
        os.close(fd)
        os.close(exit_fd)


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    if sig == signal.SIGKILL:
        # Processes that left the group still die with the namespace's PID 1.
        for child in children_of(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def read_exit_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def exit_code(proc: subprocess.Popen[bytes], exit_file: Path) -> int:
    """The command's own code from the preamble, else from how unshare ended."""
    recorded = read_exit_file(exit_file)
    if recorded is not None:
        return recorded
    code = proc.returncode if proc.returncode is not None else 137
    return 128 - code if code < 0 else code


def process_tree_rss() -> dict[int, int]:
    """RSS in bytes of every process plus all its descendants, from one /proc scan."""
    page = os.sysconf("SC_PAGE_SIZE")
    parent: dict[int, int] = {}
    own: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        own[pid] = int(fields[21]) * page
    total = dict(own)
    for pid, rss in own.items():
        seen = 0
        p = parent.get(pid, 0)
        while p > 1 and seen < 64:  # add to every ancestor
            if p in total:
                total[p] += rss
            p = parent.get(p, 0)
            seen += 1
    return total

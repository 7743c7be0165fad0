"""The product's images, built for real from the Dockerfiles.

``ImageBuilder.build_all()`` starts Debian's dockerd as a plain process (its roots in
folders of its own, no bridge, no iptables, no forwarding: it changes no host network
setting, so every build runs with ``--network host``), finds a base image for the
Dockerfiles' ``FROM`` (the official one if it is local or can be pulled, else one made
with debootstrap from a cached tarball), adds the host's CA bundle in a wrapper layer
(this machine's egress is TLS-intercepted; the Dockerfiles never learn about it), and
builds each image only when its inputs (Dockerfile, every COPY source, base image)
changed since the last build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from devstack.errors import StackStartError
from devstack.mounts import unmount_all
from devstack.paths import cache_dir, repo_root
from devstack.process import Process, run

# What the Dockerfiles' FROM names by default; the build-arg each Dockerfile takes.
OFFICIAL_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "autoreduce.local/debian-python:bookworm"
WRAPPED_BASE = "autoreduce.local/build-base"
INPUTS_LABEL = "autoreduce.inputs"
# debootstrap's minimal Debian plus what the Dockerfiles use from the official image:
# python with venv and pip, useradd (passwd is in minbase), CA certificates.
DEBOOTSTRAP_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3",
                        "ca-certificates")  # fmt: skip
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_SKIPPED = {"__pycache__", ".mypy_cache", ".pytest_cache"}


@dataclass(frozen=True)
class ImageSpec:
    """One product image: its Dockerfile, tag, and the build-arg naming its base."""

    dockerfile: str
    repository: str
    base_arg: str

    def tag(self, version: str) -> str:
        return f"{self.repository}:{version}"


RUNNER = ImageSpec("Dockerfile.runner", "autoreduce-runner", "BASE_IMAGE")
DISPATCHER = ImageSpec("Dockerfile.dispatcher", "autoreduce-dispatcher", "PYTHON_IMAGE")
PRODUCT_IMAGES = (RUNNER, DISPATCHER)


def product_version(root: Path) -> str:
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return str(data["project"]["version"])


# -- the engine ----------------------------------------------------------------------


@dataclass
class DockerEngine:
    """dockerd as a plain process. ``data_root`` persists (it is the build cache);
    ``exec_root`` is short because socket paths are limited to 107 bytes."""

    data_root: Path = field(default_factory=lambda: cache_dir() / "docker")
    exec_root: Path = Path("/run/autoreduce/docker")
    log_path: Path = field(default_factory=lambda: cache_dir() / "logs" / "dockerd.log")
    process: Process | None = None

    @property
    def socket(self) -> Path:
        return self.exec_root / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        # The docker CLI found here has no buildx: the legacy builder does the work.
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}

    def answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"200 OK" in sock.recv(256)
        except OSError:
            return False

    def start(self) -> None:
        """Starts dockerd unless one already serves this data root (then uses it)."""
        if self.answers():
            return
        if shutil.which("dockerd") is None:
            raise StackStartError("dockerd not found: install Debian's docker.io "
                                  "(scripts/bootstrap.sh does)")  # fmt: skip
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_pidfile()
        config = self.exec_root / "daemon.json"
        config.write_text("{}\n")  # never /etc/docker/daemon.json: the host's is not ours
        argv = [
            "dockerd", f"--config-file={config}", f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}", f"--pidfile={self.exec_root / 'docker.pid'}",
            f"--host=unix://{self.socket}",
            # Nothing on the host network changes: no docker0, no NAT, no forwarding.
            "--iptables=false", "--ip6tables=false", "--ip-forward=false",
            "--ip-masq=false", "--bridge=none", "--userland-proxy=false",
            "--log-level=warn",
        ]  # fmt: skip
        # SIGTERM if the caller dies: dockerd then stops its own containerd and shims.
        self.process = Process("dockerd", argv, self.log_path, self.answers, stop_timeout=20,
                               parent_death_signal=signal.SIGTERM)  # fmt: skip
        self.process.start(timeout=60)

    def _remove_stale_pidfile(self) -> None:
        """A dockerd killed outright leaves its pid file, and the next one refuses to
        start while it exists."""
        pidfile = self.exec_root / "docker.pid"
        try:
            pid = int(pidfile.read_text().strip())
            alive = Path(f"/proc/{pid}/exe").resolve().name == "dockerd"
        except (OSError, ValueError):
            alive = False
        if not alive:
            pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stops dockerd if this object started it (it stops its own containerd)."""
        if self.process is not None:
            self.process.stop()
            self.process = None
            # dockerd bind-mounts its data root onto itself and keeps a netns mount
            # in its exec root; it leaves both when it exits.
            unmount_all(self.data_root)
            unmount_all(self.exec_root)
            shutil.rmtree(self.exec_root, ignore_errors=True)

    def docker(self, *args: str, what: str, timeout: float = 900,
               input_bytes: bytes | None = None) -> str:  # fmt: skip
        argv = ["docker", *args]
        proc = subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout,
                              input=input_bytes, check=False)  # fmt: skip
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")
            raise RuntimeError(f"{what} failed (docker {shlex.join(args[:4])}): {out[-3000:]}")
        return proc.stdout.decode(errors="replace")

    def image_id(self, ref: str) -> str | None:
        argv = ["docker", "image", "inspect", "-f", "{{.Id}}", ref]
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def label(self, ref: str, key: str) -> str | None:
        fmt = "{{json .Config.Labels}}"
        proc = subprocess.run(["docker", "image", "inspect", "-f", fmt, ref], env=self.env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode != 0:
            return None
        labels = json.loads(proc.stdout) or {}
        value = labels.get(key)
        return str(value) if value is not None else None

    def size_mb(self, ref: str) -> float:
        return int(self.docker("image", "inspect", "-f", "{{.Size}}", ref, what="size")) / 1e6


# -- the base image ------------------------------------------------------------------


def debootstrap_tarball(*, suite: str = "bookworm", mirror: str | None = None) -> Path:
    """A minimal Debian with python3/venv/pip, tarred once and cached: debootstrap
    downloads every package each time it runs."""
    key = hashlib.sha256(f"{suite} {DEBOOTSTRAP_PACKAGES}".encode()).hexdigest()[:12]
    tarball = cache_dir() / "base" / f"debian-{suite}-python-{key}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise StackStartError("debootstrap not found: install it (scripts/bootstrap.sh does)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        argv = ["debootstrap", "--variant=minbase",
                f"--include={','.join(DEBOOTSTRAP_PACKAGES)}", suite, str(rootfs)]  # fmt: skip
        run([*argv, mirror] if mirror else argv, what="debootstrap of the base image",
            timeout=1800)  # fmt: skip
        # The official image's python is its own build and has no such marker; without
        # removing it, `pip install` outside a venv would refuse as on a Debian host.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            what="tar of the base image")  # fmt: skip
        partial.rename(tarball)
    return tarball


@dataclass
class ImageBuilder:
    engine: DockerEngine = field(default_factory=DockerEngine)
    root: Path = field(default_factory=repo_root)
    allow_pull: bool = True
    pull_timeout: float = 60.0
    timings: dict[str, float] = field(default_factory=dict)
    image_ids: dict[str, str | None] = field(default_factory=dict)  # tag -> ID, once saved

    def base_image(self) -> str:
        """The Dockerfiles' own FROM when it is here or can be pulled, else ours."""
        if self.engine.image_id(OFFICIAL_BASE):
            return OFFICIAL_BASE
        if self.engine.image_id(LOCAL_BASE):
            return LOCAL_BASE
        if self.allow_pull and self._pull(OFFICIAL_BASE):
            return OFFICIAL_BASE
        started = time.monotonic()
        tarball = debootstrap_tarball()
        self.timings["debootstrap"] = time.monotonic() - started
        started = time.monotonic()
        self.engine.docker("import", "--change", 'CMD ["python3"]', str(tarball), LOCAL_BASE,
                           what="docker import of the base image")  # fmt: skip
        self.timings["base import"] = time.monotonic() - started
        return LOCAL_BASE

    def _pull(self, ref: str) -> bool:
        try:
            self.engine.docker("pull", "-q", ref, what=f"pull {ref}", timeout=self.pull_timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def wrapped_base(self) -> str:
        """The base plus the host's CA bundle, for pip inside the builds."""
        base = self.base_image()
        base_id = self.engine.image_id(base) or base
        bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
        key = hashlib.sha256(base_id.encode() + bundle).hexdigest()[:16]
        tag = f"{WRAPPED_BASE}:{key}"
        if self.engine.image_id(tag):
            return tag
        with tempfile.TemporaryDirectory(prefix="wrap-base-") as tmp:
            context = Path(tmp)
            (context / "host-ca.crt").write_bytes(bundle)
            ca = "/etc/ssl/certs/autoreduce-host-ca.crt"
            (context / "Dockerfile").write_text(
                f"FROM {base}\nCOPY host-ca.crt {ca}\n"
                f"ENV PIP_CERT={ca} REQUESTS_CA_BUNDLE={ca} SSL_CERT_FILE={ca}\n"
            )
            self.engine.docker("build", "--network", "host", "-q", "-t", tag, str(context),
                               what="the CA wrapper layer")  # fmt: skip
        return tag

    def inputs_hash(self, spec: ImageSpec, base: str) -> str:
        """Dockerfile, every COPY source it names (recursively), and the base image."""
        digest = hashlib.sha256()
        dockerfile = self.root / spec.dockerfile
        digest.update(dockerfile.read_bytes())
        digest.update((self.engine.image_id(base) or base).encode())
        for source in sorted(copy_sources(dockerfile.read_text())):
            for path in _files(self.root / source):
                digest.update(str(path.relative_to(self.root)).encode() + b"\0")
                digest.update(path.read_bytes())
        return digest.hexdigest()[:24]

    def build(self, spec: ImageSpec, *, base: str) -> str:
        """Builds ``spec`` unless an image with the same inputs is already tagged."""
        tag = spec.tag(product_version(self.root))
        inputs = self.inputs_hash(spec, base)
        if self.engine.label(tag, INPUTS_LABEL) == inputs:
            return tag
        started = time.monotonic()
        self.engine.docker(
            "build", "--network", "host", "-f", str(self.root / spec.dockerfile),
            "--build-arg", f"{spec.base_arg}={base}", "--label", f"{INPUTS_LABEL}={inputs}",
            "-t", tag, str(self.root), what=f"build of {tag}",
        )  # fmt: skip
        self.timings[f"build {spec.repository}"] = time.monotonic() - started
        return tag

    def build_all(self) -> dict[str, str]:
        """Every product image: repository -> tag."""
        self.engine.start()
        base = self.wrapped_base()
        return {spec.repository: self.build(spec, base=base) for spec in PRODUCT_IMAGES}

    def save(self, tags: list[str]) -> bytes:
        """A docker-archive tarball of ``tags``, for ``ctr images import``."""
        return subprocess.run(["docker", "save", *tags], env=self.engine.env,
                              capture_output=True, check=True).stdout  # fmt: skip


def copy_sources(dockerfile: str) -> list[str]:
    """The build-context paths a Dockerfile's COPY/ADD lines read (not --from ones)."""
    sources: list[str] = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources.extend(p.rstrip("/") or "." for p in paths[:-1])
    return sources


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and not _SKIPPED.intersection(p.parts) and p.suffix != ".pyc"
    )  # fmt: skip


def make_pause_image(engine: DockerEngine, *, binary: Path, tag: str) -> str:
    """The pod sandbox image: hack/controlplane's static pause program alone."""
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
    if engine.label(tag, INPUTS_LABEL) == digest:
        return tag
    with tempfile.TemporaryDirectory(prefix="pause-") as tmp:
        context = Path(tmp)
        shutil.copy2(binary, context / "pause")
        (context / "Dockerfile").write_text(
            f'FROM scratch\nCOPY pause /pause\nLABEL {INPUTS_LABEL}="{digest}"\n'
            'USER 65535:65535\nENTRYPOINT ["/pause"]\n'
        )
        engine.docker("build", "-q", "-t", tag, str(context), what="the pause image")
    return tag



def node_image_archive(builder: ImageBuilder, *, archive: Path, pause_binary: Path,
                       pause_tag: str) -> dict[str, str]:  # fmt: skip
    """Builds what a node runs (the product images and the pause image) and saves them
    in one docker-archive for every node's ``ctr images import``: no registry here.

    Stacks on one host share dockerd's data root (the build cache), so one at a time
    builds and saves: another stack's dockerd stopping, or a checkout with other inputs
    re-tagging, can then never change an image between its build and its save."""
    lock_path = cache_dir() / "images.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tags = builder.build_all()
            make_pause_image(builder.engine, binary=pause_binary, tag=pause_tag)
            builder.image_ids = {tag: builder.engine.image_id(tag) for tag in tags.values()}
            started = time.monotonic()
            archive.parent.mkdir(parents=True, exist_ok=True)
            partial = archive.with_suffix(".partial")
            partial.write_bytes(builder.save([*tags.values(), pause_tag]))
            partial.rename(archive)
            builder.timings["docker save"] = time.monotonic() - started
        finally:
            builder.engine.stop()  # the images are in the archive: dockerd is done
    return tags

"""Readiness, liveness and startup probes: httpGet, tcpSocket and exec."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


def _port(value: int | str, container: Obj) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"unknown named port {value!r}")


def _http(probe: Obj, container: Obj, timeout: float) -> bool:
    get = probe["httpGet"]
    scheme = str(get.get("scheme", "HTTP")).lower()
    host = get.get("host") or "127.0.0.1"
    url = f"{scheme}://{host}:{_port(get['port'], container)}{get.get('path', '/')}"
    headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
    request = urllib.request.Request(url, headers=headers)
    context = (
        ssl._create_unverified_context() if scheme == "https" else None
    )  # kubelet skips verify
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:
            return bool(200 <= resp.status < 400)
    except urllib.error.HTTPError as exc:
        return 200 <= exc.code < 400
    except (OSError, ValueError):
        return False


def _tcp(probe: Obj, container: Obj, timeout: float) -> bool:
    sock = probe["tcpSocket"]
    try:
        with socket.create_connection(
            (sock.get("host") or "127.0.0.1", _port(sock["port"], container)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def _exec(probe: Obj, ns_pid: int | None, env: dict[str, str], timeout: float) -> bool:
    if ns_pid is None:
        return False
    # Run inside the container's mount namespace so its volumes are where it expects.
    argv = ["/usr/bin/nsenter", "-t", str(ns_pid), "-m", "--", *probe["exec"]["command"]]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return done.returncode == 0


@dataclass
class Prober:
    """One probe of one container; ``tick`` starts a check in a thread when it is due."""

    kind: str
    probe: Obj
    started_at: float
    successes: int = 0
    failures: int = 0
    result: bool | None = None  # None until the threshold is crossed either way
    _next: float = 0.0
    _busy: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._next = self.started_at + float(self.probe.get("initialDelaySeconds", 0))

    def tick(self, container: Obj, ns_pid: int | None, env: dict[str, str]) -> None:
        now = time.monotonic()
        with self._lock:
            if self._busy or now < self._next:
                return
            self._busy = True
            self._next = now + float(self.probe.get("periodSeconds", 10))
        threading.Thread(
            target=self._check, args=(container, ns_pid, env), daemon=True, name="probe"
        ).start()

    def _check(self, container: Obj, ns_pid: int | None, env: dict[str, str]) -> None:
        timeout = float(self.probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in self.probe:
                ok = _http(self.probe, container, timeout)
            elif "tcpSocket" in self.probe:
                ok = _tcp(self.probe, container, timeout)
            elif "exec" in self.probe:
                ok = _exec(self.probe, ns_pid, env, timeout)
            else:
                ok = True  # grpc probes are not supported: treated as passing
        except ValueError:
            ok = False
        with self._lock:
            self._record(ok)
            self._busy = False

    def _record(self, ok: bool) -> None:
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.result = False

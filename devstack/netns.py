"""Network namespaces of the stack's own, and TCP relays between namespaces.

A node's processes run in a namespace of their own (entered with ``nsenter --net``,
never ``ip netns exec``, which also makes a new mount namespace and hides the pod
volumes the kubelet mounts). The namespace has no link to the host: the stack's
services listen on the host's loopback, so a relay carries each one across. A relay's
listening socket is made *inside* the namespace by a thread that entered it with
setns(2) (a socket stays in the namespace it was made in), so nothing on the host's
network changes and nothing needs routing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from devstack.process import run

_CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns: Path | None, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket in ``netns`` (None: the caller's). Made on a throwaway thread so
    the caller's own namespace never changes."""
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with netns.open("rb") as ns:
                _setns(ns.fileno())
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller below
            made.append(exc)

    thread = threading.Thread(target=make, name="netns-socket")
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass
class NetNamespace:
    """``/run/netns/<name>`` with loopback up and the addresses the node needs."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args], what=f"ip {' '.join(args[:3])} in {self.name}")

    def create(self) -> None:
        if self.path.exists():  # left by a run that was killed: start clean
            self.delete()
        run(["ip", "netns", "add", self.name], what=f"creating network namespace {self.name}")
        self.ip("link", "set", "lo", "up")

    def add_uplink(self, *, address: str, gateway: str) -> None:
        """A veth pair with both ends inside (the kernel has no dummy interface here):
        the kubelet wants its node IP on an interface, and a default route."""
        self.ip("link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
        self.ip("addr", "add", f"{address}/32", "dev", "uplink0")
        self.ip("link", "set", "uplink0", "up")
        self.ip("link", "set", "uplink1", "up")
        self.ip("route", "add", "default", "via", gateway, "dev", "uplink0", "onlink")
        # Nothing outside the stack is reachable from a node: say so at once
        # (ENETUNREACH) rather than let DNS lookups and connects time out. A pull from a
        # registry that cannot be reached then fails in milliseconds, as on an
        # air-gapped node, not after the resolver's retries. Local addresses, the pod
        # bridge and the relays' addresses are more specific and still reach.
        self.ip("route", "add", "unreachable", "0.0.0.0/1")
        self.ip("route", "add", "unreachable", "128.0.0.0/1")

    def add_local_address(self, address: str) -> None:
        self.ip("addr", "add", f"{address}/32", "dev", "lo")

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def delete(self) -> None:
        if self.path.exists():
            run(["ip", "netns", "delete", self.name], what=f"deleting netns {self.name}")


@dataclass
class Relay:
    """Accepts on ``listen`` (in ``listen_ns``) and connects each client to ``target``
    (in ``target_ns``), copying bytes both ways until either side closes."""

    listen: tuple[str, int]
    target: tuple[str, int]
    listen_ns: Path | None = None
    target_ns: Path | None = None
    _server: socket.socket | None = field(default=None, repr=False)
    _open: set[socket.socket] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> None:
        server = socket_in(self.listen_ns)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self.listen)
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True,
                         name=f"relay-{self.listen[1]}").start()  # fmt: skip

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        upstream = socket_in(self.target_ns)
        try:
            upstream.connect(self.target)
        except OSError:
            client.close()
            upstream.close()
            return
        with self._lock:
            self._open.update((client, upstream))
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """One direction. EOF is passed on as a half-close so the other direction can
    finish; a broken side breaks both, or an idle watch would hold the other for ever."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)

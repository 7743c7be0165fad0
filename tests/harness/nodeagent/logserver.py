"""The kubelet's HTTPS endpoint, as far as the apiserver needs it for ``pods/log``.

``GET /containerLogs/{namespace}/{pod}/{container}`` with ``follow``, ``tailLines``,
``limitBytes``, ``timestamps`` (each line gets the time the agent serves it, close to
the real time only while following) and ``previous``; plus ``/healthz``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from tests.harness.nodeagent.containers import Container
from tests.harness.nodeagent.podspec import now_rfc3339

log = logging.getLogger("nodeagent.http")

# (namespace, pod, container) -> the container, or an error text for a 404/400
Lookup = Callable[[str, str, str], Container | str]


class LogRequestError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _stamp(data: bytes) -> bytes:
    ts = now_rfc3339().encode()
    return b"".join(ts + b" " + line for line in data.splitlines(keepends=True))


class Handler(BaseHTTPRequestHandler):
    lookup: Lookup  # set on the subclass made by serve()

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path in ("/healthz", "/healthz/ping"):
            self._reply(200, b"ok")
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._reply(404, b"not found")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            self._logs(parts[1], parts[2], parts[3], query)
        except LogRequestError as exc:
            self._reply(exc.code, str(exc).encode())
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _logs(self, namespace: str, pod: str, name: str, query: dict[str, str]) -> None:
        found = type(self).lookup(namespace, pod, name)
        if isinstance(found, str):
            raise LogRequestError(404, found)
        container = found
        previous = query.get("previous") in ("true", "1")
        path = self._path(container, previous, pod)
        data = path.read_bytes()
        size = len(data)
        if "tailLines" in query:
            data = _tail(data, int(query["tailLines"]))
        stamps = query.get("timestamps") in ("true", "1")
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = self._send(_stamp(data) if stamps else data, limit, 0)
        if query.get("follow") in ("true", "1") and not previous:
            self._follow(container, path, size, stamps, limit, sent)

    def _path(self, c: Container, previous: bool, pod: str) -> Path:
        if previous:
            if c.restart_count == 0:
                raise LogRequestError(
                    400, f'previous terminated container "{c.name}" in pod "{pod}" not found'
                )
            return c.log_file(c.restart_count - 1)
        path = c.log_file()
        if not path.exists():
            reason = c.state.get("waiting", {}).get("reason", "ContainerCreating")
            raise LogRequestError(
                400, f'container "{c.name}" in pod "{pod}" is waiting to start: {reason}'
            )
        return path

    def _send(self, data: bytes, limit: int | None, sent: int) -> int:
        if limit is not None:
            data = data[: max(0, limit - sent)]
        if data:
            self.wfile.write(data)
            self.wfile.flush()
        return sent + len(data)

    def _follow(
        self, c: Container, path: Path, offset: int, stamps: bool, limit: int | None, sent: int
    ) -> None:
        """Stream what the process appends until it has exited and the file is drained."""
        restart = c.restart_count
        with path.open("rb") as fh:
            fh.seek(offset)
            while limit is None or sent < limit:
                chunk = fh.read(65536)
                if chunk:
                    sent = self._send(_stamp(chunk) if stamps else chunk, limit, sent)
                    continue
                if not c.running or c.restart_count != restart:
                    rest = fh.read()
                    if rest:
                        self._send(_stamp(rest) if stamps else rest, limit, sent)
                    return
                time.sleep(0.1)


def serve(*, port: int, cert: Path, key: Path, lookup: Lookup) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"lookup": staticmethod(lookup)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-http").start()
    return server

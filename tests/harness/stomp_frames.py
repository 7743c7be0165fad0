"""A STOMP 1.2 session on a bare socket, frame by frame.

For tests that must show what the broker itself answers (a RECEIPT or an ERROR
frame), with no client library in between to retry, reword or swallow it.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

# STOMP 1.2 header escapes, decoded.
_UNESCAPE = {"\\c": ":", "\\n": "\n", "\\r": "\r", "\\\\": "\\"}


@dataclass(frozen=True)
class Frame:
    command: str
    headers: dict[str, str]
    body: str


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in _UNESCAPE:
            out.append(_UNESCAPE[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _parse(raw: bytes) -> Frame:
    head, _, body = raw.decode(errors="replace").partition("\n\n")
    lines = head.lstrip("\r\n").splitlines()
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(_unescape(name), _unescape(value))  # the first one counts
    return Frame(lines[0] if lines else "", headers, body)


class RawStomp:
    """One connection as ``user``; over TLS (verifying the broker) when ``ca_file`` is
    given. ``request`` sends a frame with a receipt and returns the broker's answer."""

    def __init__(self, host: str, port: int, *, user: str, password: str,
                 ca_file: Path | None) -> None:  # fmt: skip
        raw = socket.create_connection((host, port), timeout=10)
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
            self._sock: socket.socket = context.wrap_socket(raw, server_hostname=host)
        else:
            self._sock = raw
        self._buffer = b""
        self._send("CONNECT", {"accept-version": "1.2", "host": "localhost", "login": user,
                               "passcode": password, "heart-beat": "0,0"})
        self.connected = self.next_frame()

    def _send(self, command: str, headers: dict[str, str], body: str = "") -> None:
        lines = [command, *(f"{name}:{value}" for name, value in headers.items())]
        self._sock.sendall(("\n".join(lines) + "\n\n" + body + "\x00").encode())

    def next_frame(self) -> Frame:
        while b"\x00" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\x00")
        return _parse(raw)

    def request(self, command: str, headers: dict[str, str], body: str = "") -> Frame:
        """Send with a receipt; the RECEIPT or ERROR frame that answers it (MESSAGE
        frames of a subscription on the way are skipped)."""
        receipt = uuid.uuid4().hex[:8]
        self._send(command, {**headers, "receipt": receipt}, body)
        while True:
            frame = self.next_frame()
            if frame.headers.get("receipt-id") == receipt:
                return frame
            if frame.command == "ERROR":  # an ERROR for no receipt: still the answer
                return frame

    def close(self) -> None:
        try:
            self._send("DISCONNECT", {})
        finally:
            self._sock.close()

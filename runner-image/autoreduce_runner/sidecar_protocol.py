"""What the runner and its poster sidecar say to each other (pure).

The sidecar is the only container of a reduction pod that mounts the broker
credential; the runner asks it to post each outcome over a Unix socket in an
emptyDir both mount. One JSON object per line: the runner sends
``{"destination", "message", "headers"}``; the sidecar answers once the broker has
confirmed the message (``{"ok": true}``) or has given up (``{"ok": false, "error",
"kind"}``, where ``kind`` says which BrokerError the runner raises).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class FailureKind(StrEnum):
    BROKER = "broker"  # unreachable, or no receipt: the message may or may not be there
    REFUSED = "refused"  # the broker said no (its authorization): certainly not there
    TLS = "tls"  # TLS to the broker fails for a reason retrying cannot fix
    REQUEST = "request"  # the sidecar will not send this (not an outcome queue, junk)


@dataclass(frozen=True)
class PostRequest:
    destination: str
    message: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PostReply:
    ok: bool
    error: str = ""
    kind: FailureKind = FailureKind.BROKER


def encode_request(request: PostRequest) -> bytes:
    return _line({"destination": request.destination, "message": request.message,
                  "headers": request.headers})


def decode_request(line: bytes) -> PostRequest:
    """ValueError when the line is not a request."""
    data = _object(line)
    destination, message = data.get("destination"), data.get("message")
    headers = data.get("headers") or {}
    if not isinstance(destination, str) or not isinstance(message, dict):
        raise ValueError("a request needs a destination (text) and a message (object)")
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ValueError("headers must map text to text")
    return PostRequest(destination, message, dict(headers))


def encode_reply(reply: PostReply) -> bytes:
    if reply.ok:
        return _line({"ok": True})
    return _line({"ok": False, "error": reply.error, "kind": reply.kind.value})


def decode_reply(line: bytes) -> PostReply:
    """ValueError when the line is not a reply."""
    data = _object(line)
    if data.get("ok") is True:
        return PostReply(ok=True)
    try:
        kind = FailureKind(data.get("kind", FailureKind.BROKER))
    except ValueError:
        kind = FailureKind.BROKER
    return PostReply(ok=False, error=str(data.get("error", "")), kind=kind)


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=True).encode() + b"\n"


def _object(line: bytes) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data

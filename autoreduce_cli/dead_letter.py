"""Dead-lettered messages as the operator sees them: a table of all, or one whole (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autoreduce_cli.tables import age, table


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    timestamp_ms: int
    reason: str
    instrument: str
    run: str
    body: str
    headers: dict[str, str]


def dead_letter(headers: Mapping[str, str], body: bytes) -> DeadLetter:
    """A DLQ message as the operator sees it (the body may not even be JSON)."""
    text = body.decode("utf-8", errors="replace")
    instrument, run = "", ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        instrument = str(parsed.get("instrument") or "")
        run = str(parsed.get("run_number") if parsed.get("run_number") is not None else "")
    try:
        stamp = int(headers.get("timestamp", "0"))
    except ValueError:
        stamp = 0
    return DeadLetter(
        message_id=str(headers.get("message-id", "")),
        timestamp_ms=stamp,
        reason=str(headers.get("autoreduce-reason", "")),
        instrument=instrument,
        run=run,
        body=text,
        headers=dict(headers),
    )


def format_dead_letters(letters: Sequence[DeadLetter], *, now: float) -> str:
    if not letters:
        return "dead-letter queue is empty\n"
    rows = [
        [
            d.message_id,
            age(now - d.timestamp_ms / 1000) if d.timestamp_ms else "-",
            d.instrument or "-",
            d.run or "-",
            d.reason[:100],
        ]
        for d in letters
    ]
    return table(["MESSAGE-ID", "AGE", "INSTRUMENT", "RUN", "REASON"], rows) + "\n"


def format_dead_letter(letter: DeadLetter) -> str:
    try:
        body = json.dumps(json.loads(letter.body), indent=2, sort_keys=True)
    except ValueError:
        body = letter.body
    headers = "\n".join(f"  {k}: {v}" for k, v in sorted(letter.headers.items()))
    return (
        f"message-id: {letter.message_id}\n"
        f"reason (autoreduce-reason): {letter.reason or '-'}\n"
        f"headers:\n{headers}\nbody:\n{body}\n"
    )

"""Messages the dispatcher sends: outcomes on a run's behalf and dead letters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from autoreduce_common.broker_settings import QueueNames
from autoreduce_common.messages import Outcome, bound_text, echo, encode
from autoreduce_common.pod_contract import outcome_headers
from autoreduce_common.stomp_client import StompClient

from dispatcher import failures

log = logging.getLogger(__name__)

REASON_HEADER = "autoreduce-reason"
# A DLQ header must stay small: brokers and consoles choke on huge headers.
MAX_REASON = 900


def error_body(raw: dict[str, Any], *, message: str, retry_in: int | None = None) -> dict[str, Any]:
    """ReductionError for ``raw``, with a bounded reason (consumers store it)."""
    # retry_in is always set, to None when not retrying: echoing a retry_in that the
    # incoming message happened to carry would ask the web app for a retry we never meant.
    return echo(raw, message=bound_text(message, limit=4000), retry_in=retry_in)


ON_BEHALF_NOTE = (
    "Posted by the autoreduce dispatcher on the run's behalf: {reason}. The reduction's "
    "own logs are in `kubectl logs` of its Job while the Job exists."
)


def on_behalf_body(raw: dict[str, Any], *, verdict: failures.Verdict,
                   retry_in: int | None) -> dict[str, Any]:
    """The outcome message the dispatcher sends for a run: an error it diagnosed, or
    the very outcome the runner was sending when it was stopped."""
    if verdict.outcome is Outcome.ERROR:
        body = error_body(raw, message=verdict.message, retry_in=retry_in)
    else:
        body = {**raw, "message": verdict.message or None, "retry_in": None}
    if verdict.reduction_data:
        body["reduction_data"] = list(verdict.reduction_data)
    body["admin_log"] = ON_BEHALF_NOTE.format(reason=verdict.reason)
    return body


@dataclass
class Reporter:
    """Sends outcomes, dead letters and retries on its own connection.

    ``client`` should be made with ``heartbeats=False`` and a receipt timeout longer
    than a broker stall we want to ride out: an unconfirmed send is retried by the
    caller, and a retry after a RECEIPT lost in a stall is a duplicate outcome.
    """

    client: StompClient
    queues: QueueNames

    def send(self, *, destination: str, body: bytes, **options: Any) -> None:
        """Connect if need be, send persistently and wait for the receipt.

        BrokerError when the broker is unreachable or did not confirm: the callers
        leave the run as it is and try again on their next pass.
        """
        if not self.client.connected:
            self.client.connect()
        self.client.send(destination=destination, body=body, **options)

    def post(self, outcome: Outcome, body: dict[str, Any], *, outcome_id: str,
             possible_repeat: bool = False) -> None:
        """Persistent send, confirmed by a broker receipt (BrokerError otherwise).

        ``outcome_id`` is the run version's Job name (the runner sends the same one);
        ``possible_repeat`` when a copy of this outcome may have been sent before.
        """
        self.send(destination=self.queues.for_outcome(outcome), body=encode(body),
                  headers=outcome_headers(outcome_id=outcome_id,
                                          possible_repeat=possible_repeat))

    def dead_letter(self, *, body: bytes, headers: dict[str, str], reason: str) -> None:
        """Park a message we cannot process, with why, for an operator to inspect or requeue."""
        kept = {
            f"original-{key}": value[:200]
            for key, value in headers.items()
            if key in {"message-id", "destination", "priority", "timestamp"}
        }
        kept[REASON_HEADER] = _header_safe(reason)[:MAX_REASON]
        self.send(destination=self.queues.dead_letter, body=body, headers=kept)
        log.warning("dead-lettered message %s: %s", headers.get("message-id", "?"), reason)


def _header_safe(text: str) -> str:
    # STOMP 1.2 escapes \n, \r and ':' itself; keep the header on one readable line.
    return " ".join(text.split())

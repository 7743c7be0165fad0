"""What the runner pod and the dispatcher agree on, defined once for both (pure).

- the files and environment of the runner container: the paths where the Job mounts
  the run's message, the broker password and the runner config, the termination-log
  path, and the ``AUTOREDUCE_*`` names the Job sets (the dispatcher's Job template
  gets them as ``pod.paths`` and ``pod.env``; the runner's settings default to them);
- the exit codes of the runner container;
- the termination report: the JSON the runner writes to its termination-message file
  and the dispatcher reads back from the pod status (written and parsed here only);
- the headers every outcome message carries, whoever sends it;
- the text of an out-of-memory ReductionError, whoever saw the OOM kill (the runner,
  from its memory cgroup, or the dispatcher, from an ``OOMKilled`` container status).

The termination report is how "exactly one outcome kind per run" survives a kill at
any instant. The runner records what it is about to send *before* it sends
(``Stage.SENDING``) and records ``Stage.POSTED`` after the broker's receipt. The
kubelet keeps the file's last content even after a SIGKILL, so the dispatcher, finding
``SENDING`` without ``POSTED``, knows the outcome may already be on the broker and
re-sends that same outcome, never a different one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from enum import IntEnum, StrEnum
from typing import Any

from autoreduce_common.messages import Outcome, bound_text

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_BYTES = 4096
TERMINATION_MESSAGE_CHARS = 700  # the free text; x 4 bytes of UTF-8 leaves room for the rest
MAX_RECORDED_DESTINATIONS = 8

# Where the runner finds its files in the reduction pod. The run's ConfigMap holds the
# message under MESSAGE_KEY and is mounted as MESSAGE_DIR, so the key is the file's name.
MESSAGE_KEY = "message.json"
MESSAGE_DIR = "/etc/autoreduce/message"
MESSAGE_FILE = f"{MESSAGE_DIR}/{MESSAGE_KEY}"
# The broker Secret's password item, mounted under this name in BROKER_DIR.
BROKER_DIR = "/etc/autoreduce/broker"
BROKER_PASSWORD_KEY = "password"  # noqa: S105 - a file name
BROKER_PASSWORD_FILE = f"{BROKER_DIR}/{BROKER_PASSWORD_KEY}"
# TLS to the broker, when on: the CA bundle (a ConfigMap's item, mounted under this
# file name) and the runners' client certificate (a kubernetes.io/tls Secret).
BROKER_CA_DIR = "/etc/autoreduce/broker-ca"
BROKER_CA_KEY = "ca.crt"
BROKER_CA_FILE = f"{BROKER_CA_DIR}/{BROKER_CA_KEY}"
BROKER_CLIENT_CERT_DIR = "/etc/autoreduce/broker-client"
BROKER_CLIENT_CERT_FILE = f"{BROKER_CLIENT_CERT_DIR}/tls.crt"
BROKER_CLIENT_KEY_FILE = f"{BROKER_CLIENT_CERT_DIR}/tls.key"
# The poster sidecar (the only container holding the broker credential) listens on a
# Unix socket in an emptyDir both containers mount; its own state is in another
# emptyDir that only it mounts.
POSTER_SOCKET_DIR = "/run/autoreduce/poster"
POSTER_SOCKET = f"{POSTER_SOCKET_DIR}/poster.sock"
POSTER_STATE_DIR = "/run/autoreduce/poster-state"
# The site's runner config (the chart's runner ConfigMap, key runner.yaml), when it has one.
RUNNER_CONFIG_DIR = "/etc/autoreduce/runner"
RUNNER_CONFIG_FILE = f"{RUNNER_CONFIG_DIR}/runner.yaml"
# The only writable place in the pod (the root filesystem is read-only): an emptyDir.
SCRATCH_DIR = "/tmp"  # noqa: S108 - a mounted emptyDir
# Kubernetes reads this file into the pod status when the container ends.
TERMINATION_LOG = "/dev/termination-log"


class PodEnv(StrEnum):
    """The runner's environment variables that the Job sets. Each is the name under
    which the runner's settings read one field (prefix ``AUTOREDUCE_``, ``__`` between
    levels); a unit test keeps the two equal."""

    MESSAGE_FILE = "AUTOREDUCE_MESSAGE_FILE"
    TERMINATION_LOG = "AUTOREDUCE_TERMINATION_LOG"
    RUNNER_CONFIG = "AUTOREDUCE_RUNNER_CONFIG"
    # The run's outcome identity (its Job's name), sent as a header on every outcome.
    OUTCOME_ID = "AUTOREDUCE_OUTCOME_ID"
    BROKER_HOSTS = "AUTOREDUCE_BROKER__HOSTS"
    BROKER_USERNAME = "AUTOREDUCE_BROKER__USERNAME"
    BROKER_PASSWORD_FILE = "AUTOREDUCE_BROKER__PASSWORD_FILE"  # noqa: S105 - a name
    BROKER_OUTCOME_RECEIPT_TIMEOUT_S = "AUTOREDUCE_BROKER__OUTCOME_RECEIPT_TIMEOUT_S"
    # Followed by a queue's field name in upper case (..._QUEUES__ERROR).
    BROKER_QUEUE_PREFIX = "AUTOREDUCE_BROKER__QUEUES__"
    BROKER_TLS_ENABLED = "AUTOREDUCE_BROKER__TLS__ENABLED"
    BROKER_TLS_CA_FILE = "AUTOREDUCE_BROKER__TLS__CA_FILE"
    BROKER_TLS_CERT_FILE = "AUTOREDUCE_BROKER__TLS__CERT_FILE"
    BROKER_TLS_KEY_FILE = "AUTOREDUCE_BROKER__TLS__KEY_FILE"
    POSTER_SOCKET = "AUTOREDUCE_POSTER_SOCKET"
    POSTER_STATE_DIR = "AUTOREDUCE_POSTER_STATE_DIR"
    # Set when a run killed for memory will be retried bigger (settings oom_retry): the
    # memory limit its next version gets, for the runner's ReductionError to say so.
    OOM_RETRY_LIMIT = "AUTOREDUCE_OOM_RETRY_LIMIT"


# Every ReductionStarted/Complete/Error/Skipped carries these (message-contract notes
# in the README): the same id on every copy of one run version's outcome, whoever
# sends it; "true" in the second when this copy may repeat one sent before.
OUTCOME_ID_HEADER = "autoreduce-outcome-id"
POSSIBLE_REPEAT_HEADER = "autoreduce-possible-repeat"


class ExitCode(IntEnum):
    """What the runner container's exit status tells the dispatcher (runner-image/README.md)."""

    POSTED_OK = 0  # ReductionComplete or ReductionSkipped posted
    POSTED_ERROR = 1  # ReductionError posted: the script's or the input's fault
    BAD_CONFIG = 2  # the runner's own configuration is unusable; nothing posted
    POSTED_RETRY = 3  # ReductionError posted with retry_in
    NOT_POSTED = 4  # the outcome was not (surely) posted: the dispatcher reports it


class Stage(StrEnum):
    """How far the runner got with its outcome."""

    NONE = "none"  # no outcome decided (config error, or stopped before the end)
    DECIDED = "decided"  # the outcome is known and was certainly not sent
    SENDING = "sending"  # the send began: the broker may hold it, unconfirmed
    POSTED = "posted"  # the broker confirmed it


@dataclass(frozen=True)
class TerminationReport:
    """The runner's termination message."""

    stage: Stage
    outcome: Outcome | None = None
    message: str = ""  # the outcome's ``message`` field, or why nothing was posted
    retry_in: int | None = None
    reduction_data: list[str] = field(default_factory=list)
    # Why, in one word, when the runner knows (OOM_KILLED): the dispatcher's retries
    # act on it without reading the message.
    reason: str = ""

    @property
    def posted(self) -> bool:
        return self.stage is Stage.POSTED

    @property
    def maybe_sent(self) -> bool:
        """The outcome may be on the broker: only this same outcome may follow."""
        return self.stage in (Stage.SENDING, Stage.POSTED)

    def render(self) -> str:
        data: dict[str, Any] = {
            "stage": self.stage.value,
            "outcome": self.outcome.value if self.outcome is not None else "none",
            "posted": self.posted,  # kept for readers of the first version of the report
            "retry_in": self.retry_in,
            "reason": self.reason[:40],
            "message": bound_text(self.message, limit=TERMINATION_MESSAGE_CHARS),
            "reduction_data": [
                bound_text(path, limit=300)
                for path in self.reduction_data[:MAX_RECORDED_DESTINATIONS]
            ],
        }
        text = json.dumps(data, ensure_ascii=False)
        while len(text.encode()) > TERMINATION_MESSAGE_BYTES and data["reduction_data"]:
            data["reduction_data"] = data["reduction_data"][:-1]
            text = json.dumps(data, ensure_ascii=False)
        return text


def parse_report(text: str) -> TerminationReport | None:
    """The report in a termination message, or None when it holds none (log text)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not ({"stage", "posted"} & set(data)):
        return None
    return TerminationReport(
        stage=_stage(data),
        outcome=_outcome(data.get("outcome")),
        message=str(data.get("message") or ""),
        retry_in=data["retry_in"] if isinstance(data.get("retry_in"), int) else None,
        reduction_data=[str(p) for p in data.get("reduction_data") or [] if isinstance(p, str)],
        reason=str(data.get("reason") or ""),
    )


def _stage(data: dict[str, Any]) -> Stage:
    try:
        return Stage(str(data.get("stage")))
    except ValueError:
        # The first version had only "posted"; an outcome it named was never sent.
        if data.get("posted"):
            return Stage.POSTED
        return Stage.DECIDED if _outcome(data.get("outcome")) else Stage.NONE


def _outcome(value: Any) -> Outcome | None:
    try:
        return Outcome(value)
    except ValueError:
        return None


# Binary units, largest first, for memory limits in messages (Kubernetes' suffixes).
_MEMORY_UNITS = (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10))
UNKNOWN_LIMIT = "?"  # no limit, or none could be read


def render_memory(count: int) -> str:
    """A byte count as a user wrote it in a pod spec, where possible.

    A whole number of Mi, Gi or Ti is exact ("256Mi", "8Gi"); anything else (a decimal
    "1G", or what cgroup v1 rounded down to whole pages) is shown to one decimal place
    ("953.7Mi"), so the runner, which reads bytes from its cgroup, and the dispatcher,
    which reads the Job's quantity, say the same thing for the same limit. Ki is exact
    only below 1Mi: every page-rounded limit is a whole number of Ki ("976560Ki").
    """
    for suffix, size in _MEMORY_UNITS:
        exact_unit = suffix != "Ki" or count < 1 << 20
        if count >= size and count % size == 0 and exact_unit:
            return f"{count // size}{suffix}"
    for suffix, size in _MEMORY_UNITS:
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


# The reason of a run killed for memory, from the kubelet (a container's terminated
# reason) or the runner (its report, when only the script was killed).
OOM_KILLED = "OOMKilled"


def out_of_memory_message(*, limit: str) -> str:
    """The ReductionError text for a run killed for memory (``limit`` already rendered)."""
    return f"Reduction ran out of memory (limit {limit}) and was killed"


def oom_retry_note(*, limit: str) -> str:
    """What the ReductionError of a run killed for memory adds when it is retried bigger."""
    return f"; it is retried as its next version with a memory limit of {limit}"


def outcome_headers(*, outcome_id: str, possible_repeat: bool) -> dict[str, str]:
    """The identity headers of one outcome message."""
    headers = {OUTCOME_ID_HEADER: outcome_id} if outcome_id else {}
    if possible_repeat:
        headers[POSSIBLE_REPEAT_HEADER] = "true"
    return headers


def started_id(outcome_id: str) -> str:
    """ReductionStarted is not the run's outcome: its own id, so "one terminal outcome
    per id" stays a rule a consumer can apply to everything it reads."""
    return f"{outcome_id}.started" if outcome_id else ""


# A Kubernetes quantity: a number, then a binary or decimal suffix or an exponent.
_QUANTITY = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|[eE][+-]?[0-9]+)?"
)
_SUFFIX_SCALE = {
    "": Decimal(1), "m": Decimal("0.001"),
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
}  # fmt: skip


def quantity_bytes(text: str) -> int | None:
    """A memory quantity ("256Mi", "1G", "1e9", "268435456") in bytes, rounded up as
    Kubernetes does; None when it is not one."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        return None
    number, suffix = Decimal(match[1]), match[2] or ""
    exponent = suffix not in _SUFFIX_SCALE  # "e9", "E3" ("E" alone is exa)
    scale = Decimal(10) ** int(suffix[1:]) if exponent else _SUFFIX_SCALE[suffix]
    return math.ceil(number * scale)

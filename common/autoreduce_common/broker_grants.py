"""What each broker identity may do, defined once (pure).

Two identities, so that a reduction script that reads its pod's credential can do
little harm: the dispatcher's (the dispatcher, the operator CLI and the chart's
canary) and the runners' (every reduction pod). The broker enforces the difference
with ActiveMQ's ``authorizationPlugin``; this module writes the
``authorizationEntry`` elements a facility's broker admin adds. The README's snippet
and the test broker's configuration are both made here, so what is documented is
what the suite runs against.

ActiveMQ unions the groups of every entry that matches a destination, so these
entries add to a facility's own (an ``admins`` entry on ``>``, say) without
replacing them. ``admin`` on a queue lets an identity create it when it does not
exist yet; a broker that declares the queues in ``<destinations>`` can leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoreduce_common.broker_settings import QueueNames

DISPATCHER_GROUP = "autoreduce-dispatcher"
RUNNER_GROUP = "autoreduce-runner"
# ActiveMQ checks ``admin`` on the advisory topic it creates for a new producer or
# consumer. Its own guidance: grant that, and neither read nor write, which would
# show every destination's traffic.
ADVISORY_TOPICS = "ActiveMQ.Advisory.>"


@dataclass(frozen=True)
class Grant:
    """One ``authorizationEntry``: a queue or topic (ActiveMQ wildcards allowed) and
    the groups that may read (consume or browse), write (send) and admin (create)."""

    kind: str  # "queue" or "topic"
    name: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    def xml(self) -> str:
        attributes = [f"{self.kind}={_attribute(self.name)}"]
        for right in ("read", "write", "admin"):
            groups = getattr(self, right)
            if groups:
                attributes.append(f"{right}={_attribute(','.join(groups))}")
        return f"<authorizationEntry {' '.join(attributes)}/>"


def _attribute(value: str) -> str:
    """A quoted XML attribute value. ``>`` stays as it is (legal there), so the
    wildcards read as an admin writes them."""
    return '"' + value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;") + '"'


def destination(stomp_name: str) -> tuple[str, str]:
    """``/queue/A.B`` -> ("queue", "A.B"); ``/topic/A`` -> ("topic", "A"). ActiveMQ
    reads a name without either prefix as a queue."""
    for kind in ("queue", "topic"):
        prefix = f"/{kind}/"
        if stomp_name.startswith(prefix):
            return kind, stomp_name[len(prefix):]
    return "queue", stomp_name


def grants(
    queues: QueueNames,
    *,
    dispatcher: str = DISPATCHER_GROUP,
    runner: str = RUNNER_GROUP,
    suffix: str = "",
) -> list[Grant]:
    """The least each identity needs. The dispatcher's identity consumes and sends
    runs (retries and the CLI's requeue and cancel), sends outcomes on a runner's
    behalf and dead letters, and browses outcome and dead-letter queues (the CLI's
    follow and dead-letter commands). The runners' may only send the four outcomes.

    ``suffix`` is appended to every queue name: ``".>"`` grants the same on every
    queue under it (the test suite's per-test queues are ``<name>.t<tag>``).
    """
    def queue(stomp_name: str) -> tuple[str, str]:
        kind, name = destination(stomp_name)
        return kind, name + suffix

    both = (dispatcher, runner)
    entries = [
        Grant(*queue(queues.pending), read=(dispatcher,), write=(dispatcher,),
              admin=(dispatcher,)),
        Grant(*queue(queues.dead_letter), read=(dispatcher,), write=(dispatcher,),
              admin=(dispatcher,)),
    ]  # fmt: skip
    for outcome_queue in queues.outcome_queues():
        entries.append(Grant(*queue(outcome_queue), read=(dispatcher,), write=both, admin=both))
    entries.append(Grant("topic", ADVISORY_TOPICS, admin=both))
    return entries


def authorization_entries(entries: list[Grant], *, indent: str = "") -> str:
    """The entries as ActiveMQ XML, one per line."""
    return "\n".join(indent + entry.xml() for entry in entries)

"""Broker security, the pure parts: the grants (defined once, documented as generated)
and the password read again for each connection (issue 19, items 2 and 5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from autoreduce_common.broker_grants import (
    DISPATCHER_GROUP,
    RUNNER_GROUP,
    Grant,
    authorization_entries,
    destination,
    grants,
)
from autoreduce_common.broker_settings import BrokerSettings, QueueNames

from autoreduce_cli.cli import main as cli_main

README = Path(__file__).resolve().parents[2] / "README.md"


def _by_name(entries: list[Grant]) -> dict[str, Grant]:
    return {entry.name: entry for entry in entries}


def test_the_runner_group_may_only_send_and_create_the_four_outcome_queues() -> None:
    entries = grants(QueueNames())
    for entry in entries:
        assert RUNNER_GROUP not in entry.read, entry
        if RUNNER_GROUP in entry.write:
            assert entry.name in {"ReductionStarted", "ReductionComplete", "ReductionError",
                                  "ReductionSkipped"}, entry
    named = _by_name(entries)
    for queue in ("ReductionPending", "ReductionPending.DLQ"):
        assert named[queue] == Grant("queue", queue, read=(DISPATCHER_GROUP,),
                                     write=(DISPATCHER_GROUP,), admin=(DISPATCHER_GROUP,))
    advisory = named["ActiveMQ.Advisory.>"]
    assert advisory.kind == "topic" and not advisory.read and not advisory.write


def test_site_queue_names_and_groups_are_used_as_given() -> None:
    queues = QueueNames(pending="/queue/Site.Pending", complete="/topic/Site.Done")
    named = _by_name(grants(queues, dispatcher="d", runner="r", suffix=".>"))
    assert named["Site.Pending.>"].read == ("d",)
    assert named["Site.Done.>"].kind == "topic"
    assert named["Site.Done.>"].write == ("d", "r")


def test_destination_names_follow_activemq_stomp_prefixes() -> None:
    assert destination("/queue/A.B") == ("queue", "A.B")
    assert destination("/topic/A") == ("topic", "A")
    assert destination("Plain") == ("queue", "Plain")


def test_xml_keeps_wildcards_readable_and_escapes_what_must_be() -> None:
    assert Grant("topic", "A.>", admin=("g",)).xml() == (
        '<authorizationEntry topic="A.>" admin="g"/>')
    assert '"a&amp;b&lt;&quot;"' in Grant("queue", 'a&b<"', read=("g",)).xml()


def test_the_readme_shows_exactly_the_generated_entries() -> None:
    blocks = re.findall(r"```xml\n(.*?)```", README.read_text(), flags=re.S)
    expected = authorization_entries(grants(QueueNames())) + "\n"
    assert expected in blocks, "README 'Broker security': regenerate with autoreduce broker-grants"


def test_the_cli_prints_them_for_the_settings_queue_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("broker:\n  queues:\n    pending: /queue/Site.Pending\n")
    assert cli_main(["broker-grants", "--config", str(config), "--runner-group", "rr"]) == 0
    out = capsys.readouterr().out
    assert '<authorizationEntry queue="Site.Pending" read="autoreduce-dispatcher"' in out
    assert ('queue="ReductionComplete" read="autoreduce-dispatcher" '
            'write="autoreduce-dispatcher,rr"') in out


def test_the_password_file_is_read_again_for_each_connection(tmp_path: Path) -> None:
    """A rotated Secret reaches the next connection without a restart; a file that is
    briefly unreadable leaves the last password read."""
    secret = tmp_path / "password"
    secret.write_text("first\n")
    settings = BrokerSettings(password_file=secret)
    assert settings.current_password() == "first"
    secret.write_text("second\n")
    assert settings.current_password() == "second"
    secret.unlink()
    assert settings.current_password() == "second"
    assert BrokerSettings(password="inline").current_password() == "inline"

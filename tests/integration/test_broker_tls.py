"""TLS to the broker (issue 19, item 1), on real ActiveMQ ``stomp+ssl`` connectors.

The suite's own broker serves stomp+ssl with a keystore the stack made
(devstack/broker_tls.py), and every client of the suite verifies it. Here: that it
really is TLS, and that the three mistakes a site makes (a wrong CA, an expired
certificate, a certificate that does not name the host) each give a clear error at
start, from the client and from a dispatcher that stays not ready and says which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autoreduce_common.broker_settings import BrokerSettings, TlsSettings
from autoreduce_common.stomp_client import BrokerError, BrokerTlsError, StompClient

from devstack.activemq import ActiveMQ, free_port, stomp_answers
from devstack.broker_tls import make_broker_tls
from devstack.node import host_address
from devstack.product import DispatcherProcess, wait_until
from tests.conftest import needs_own_component
from tests.harness.checks import http_status

pytestmark = pytest.mark.integration


def connect_error(settings: BrokerSettings) -> BrokerError:
    """The error a client gets at its first connect (it must get one)."""
    client = StompClient(settings=settings, client_name="tls-test")
    started = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        client.connect()
    # One attempt, not a hidden retry loop: a bad certificate never fixes itself.
    assert time.monotonic() - started < 30
    return caught.value


def with_tls(settings: BrokerSettings, *, hosts: list[str] | None = None,
             **tls: Any) -> BrokerSettings:  # fmt: skip
    return settings.model_copy(update={"hosts": hosts or settings.hosts,
                                       "tls": TlsSettings(enabled=True, **tls)})


@pytest.fixture(scope="module")
def bad_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ActiveMQ]]:
    """Two more real brokers: one whose certificate expired in 2020, one whose
    certificate names only ``broker.invalid`` (ActiveMQ has one keystore per broker)."""
    root = tmp_path_factory.mktemp("bad-brokers")
    made = {
        "expired": make_broker_tls(root / "expired-tls", sans=(host_address(),), expired=True),
        "misnamed": make_broker_tls(root / "misnamed-tls", sans=("broker.invalid",)),
    }
    brokers = {kind: ActiveMQ(workdir=root / kind, port=free_port(), tls=tls, heap_mb=128)
               for kind, tls in made.items()}  # fmt: skip
    try:
        for broker in brokers.values():
            broker.workdir.mkdir(parents=True, exist_ok=True)
            broker.start()
        yield brokers
    finally:
        for broker in brokers.values():
            broker.stop()


def test_the_suites_broker_speaks_only_tls(broker: Any, broker_settings: BrokerSettings) -> None:
    if not isinstance(broker, ActiveMQ) or broker.tls is None:
        # A skip locally, a failure in CI: there the broker must be the suite's own.
        needs_own_component("the suite's broker is not its own stomp+ssl broker")
    address, port = broker_settings.host_and_ports()[0]
    user, password = broker.user, broker.password
    assert stomp_answers(address, port, user=user, password=password, tls=broker.tls)
    assert not stomp_answers(address, port, user=user, password=password)  # plain STOMP
    client = StompClient(settings=broker_settings, client_name="tls-test")
    client.connect()  # verifying the broker's certificate against its CA, and its name
    client.disconnect()


@pytest.mark.parametrize("heartbeats", [True, False], ids=["consumer", "outcomes"])
def test_a_clean_disconnect_over_tls_warns_of_nothing(
    broker_settings: BrokerSettings, caplog: pytest.LogCaptureFixture, heartbeats: bool,
) -> None:
    """Every SIGTERM ends in this disconnect: an operator must not read a warning from
    stomp.py's TLS shutdown each time (one closer per socket, its I/O thread)."""
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        client = StompClient(settings=broker_settings, client_name="bye", heartbeats=heartbeats)
        client.connect()
        client.disconnect()
    time.sleep(1)  # stomp.py's I/O threads end after disconnect() returns
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_ca_that_did_not_sign_the_broker_is_a_clear_error(
    broker_settings: BrokerSettings, tmp_path: Path,
) -> None:
    other = make_broker_tls(tmp_path / "other", sans=(host_address(),))
    error = connect_error(with_tls(broker_settings, ca_file=other.ca.cert))
    assert isinstance(error, BrokerTlsError), error
    assert f"not signed by a CA in {other.ca.cert}" in str(error), error


def test_a_missing_ca_file_is_a_clear_error(broker_settings: BrokerSettings,
                                            tmp_path: Path) -> None:  # fmt: skip
    error = connect_error(with_tls(broker_settings, ca_file=tmp_path / "absent.crt"))
    assert isinstance(error, BrokerTlsError), error
    assert f"tls.ca_file {tmp_path / 'absent.crt'} is not a file" in str(error), error


def test_an_expired_broker_certificate_is_a_clear_error(
    bad_brokers: dict[str, ActiveMQ], broker_settings: BrokerSettings,
) -> None:
    expired = bad_brokers["expired"]
    assert expired.tls is not None
    error = connect_error(with_tls(broker_settings, hosts=[expired.host],
                                   ca_file=expired.tls.ca.cert))  # fmt: skip
    assert isinstance(error, BrokerTlsError), error
    assert "the broker's certificate has expired" in str(error), error


def test_a_certificate_that_does_not_name_the_host_is_a_clear_error(
    bad_brokers: dict[str, ActiveMQ], broker_settings: BrokerSettings,
) -> None:
    misnamed = bad_brokers["misnamed"]
    assert misnamed.tls is not None
    error = connect_error(with_tls(broker_settings, hosts=[misnamed.host],
                                   ca_file=misnamed.tls.ca.cert))  # fmt: skip
    assert isinstance(error, BrokerTlsError), error
    assert f"does not name {misnamed.address!r}" in str(error), error


def test_a_dispatcher_with_a_wrong_ca_stays_not_ready_and_says_why(
    start_dispatcher: Callable[..., DispatcherProcess], broker_settings: BrokerSettings,
    tmp_path: Path,
) -> None:
    other = make_broker_tls(tmp_path / "other", sans=(host_address(),))
    port = free_port()
    proc = start_dispatcher(http_port=port,
                            broker=with_tls(broker_settings, ca_file=other.ca.cert))
    line = "broker TLS fails, retrying in"
    wait_until(lambda: line in proc.log(), timeout=60, what="the dispatcher's TLS error")
    assert f"not signed by a CA in {other.ca.cert}" in proc.log()
    assert "ERROR" in next(row for row in proc.log().splitlines() if line in row)
    assert http_status(port, "/readyz") == 503
    assert http_status(port, "/healthz") == 200  # alive: a restart would not fix the CA
    assert proc.alive()

"""Fixtures that give tests the real broker and the real Kubernetes control plane.

Real components only: a broker or API server that cannot start fails the run with
the reason (in CI) instead of skipping. Set AUTOREDUCE_TEST_BROKER=host:port (with
AUTOREDUCE_TEST_BROKER_USER / _PASSWORD) or AUTOREDUCE_TEST_KUBECONFIG to run the
suite against components that already exist (a kind cluster, say).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from autoreduce_common.broker_settings import BrokerSettings, QueueNames, TlsSettings
from autoreduce_common.stomp_client import StompClient
from kubernetes import client as k8s
from pydantic import SecretStr

from devstack.activemq import ActiveMQ, Identity, free_port
from devstack.broker_tls import make_broker_tls
from devstack.controlplane import start_local_stack
from devstack.node import host_address
from devstack.product import (
    RUNNER_UID,
    DispatcherProcess,
    Facility,
    broker_ca_bundle,
    dispatcher_settings,
)
from devstack.queues import QueueReader
from devstack.stack import stop_on_signals

WORK_ROOT = Path(os.environ.get("AUTOREDUCE_TEST_WORKDIR", tempfile.gettempdir()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long fault/fuzz suites")
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files")
    parser.addoption("--repeat", type=int, default=1,
                     help="run each long fault scenario this many times (one row each)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: pass --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    # A SIGTERM (CI's timeout, say) then stops the stack as a Ctrl-C does.
    stop_on_signals()


@pytest.fixture(scope="session")
def session_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The stack's folder (etcd data, KahaDB, every component's log): removed after the
    session, kept when a test failed (or AUTOREDUCE_KEEP_WORKDIR is set), and then the
    run says where."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="autoreduce-test-", dir=WORK_ROOT))
    yield path
    if request.session.testsfailed or os.environ.get("AUTOREDUCE_KEEP_WORKDIR"):
        print(f"\nthe stack's folder is kept, with every component's log: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


def needs_own_component(reason: str) -> NoReturn:
    """A test that must restart, freeze or extend a component the suite did not start
    (AUTOREDUCE_TEST_BROKER / AUTOREDUCE_TEST_KUBECONFIG). Locally that is a skip; in CI
    every component is meant to be the suite's own, so it means one is missing: fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: every component must be the suite's own)")
    pytest.skip(reason)


# -- broker -------------------------------------------------------------------------


class ExistingBroker:
    """A broker we did not start: no restart support, and one identity for the suite,
    the dispatcher and runners alike (the authorization tests need the suite's own)."""

    def __init__(self, host: str, user: str, password: str, ca_file: str | None) -> None:
        self.host, self.user, self.password = host, user, password
        self.ca_file = Path(ca_file) if ca_file else None
        self.dispatcher = self.runner = Identity(user, password, ())

    def settings_for(self, identity: Identity, base: BrokerSettings) -> BrokerSettings:
        return base.model_copy(update={"username": identity.user,
                                       "password": SecretStr(identity.password)})

    def client_tls(self) -> TlsSettings:
        """TLS when AUTOREDUCE_TEST_BROKER_CA names the broker's CA bundle."""
        return TlsSettings(enabled=self.ca_file is not None, ca_file=self.ca_file)

    def restart(self, **_: Any) -> None:
        needs_own_component("cannot restart a broker this suite did not start")


@pytest.fixture(scope="session")
def broker(session_dir: Path) -> Iterator[ActiveMQ | ExistingBroker]:
    existing = os.environ.get("AUTOREDUCE_TEST_BROKER")
    if existing:
        yield ExistingBroker(
            existing,
            os.environ.get("AUTOREDUCE_TEST_BROKER_USER", "admin"),
            os.environ.get("AUTOREDUCE_TEST_BROKER_PASSWORD", "admin"),
            os.environ.get("AUTOREDUCE_TEST_BROKER_CA"),
        )
        return
    # stomp+ssl, as facilities run it: every client of the suite verifies the broker.
    tls = make_broker_tls(session_dir / "broker-tls", sans=(host_address(),))
    amq = ActiveMQ(workdir=session_dir / "activemq", port=free_port(), tls=tls)
    amq.workdir.mkdir(parents=True, exist_ok=True)
    amq.start()  # raises BrokerStartError with the reason: never a silent skip
    yield amq
    amq.stop()


@pytest.fixture
def queues() -> QueueNames:
    """Queue names unique to this test, so tests sharing a broker never see each other."""
    tag = uuid.uuid4().hex[:8]
    base = QueueNames()
    return QueueNames(
        **{name: f"{value}.t{tag}" for name, value in base.model_dump().items()}
    )


@pytest.fixture
def broker_settings(broker: ActiveMQ | ExistingBroker, queues: QueueNames) -> BrokerSettings:
    """The suite's own identity on this test's queues: it plays run detection and the
    web app (sends runs, reads outcomes). The product's processes connect as theirs
    (``broker.settings_for``)."""
    return BrokerSettings(
        hosts=[broker.host],
        username=broker.user,
        password=broker.password,
        heartbeat_ms=10000,
        reconnect_initial_s=0.2,
        reconnect_max_s=2.0,
        queues=queues,
        tls=broker.client_tls(),
    )


@pytest.fixture
def stomp(broker_settings: BrokerSettings) -> Iterator[StompClient]:
    client = StompClient(settings=broker_settings, client_name="test")
    client.connect()
    yield client
    client.disconnect()


@pytest.fixture
def reader(broker_settings: BrokerSettings) -> Iterator[QueueReader]:
    """Subscribed to every outcome queue and the dead-letter queue of this test."""
    r = QueueReader(broker_settings)
    q = broker_settings.queues
    for destination in (q.started, q.complete, q.error, q.skipped, q.dead_letter):
        r.watch(destination)
    yield r
    r.close()


# -- kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube(session_dir: Path, broker: ActiveMQ | ExistingBroker) -> Iterator[Any]:
    """The real control plane (etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler) and a real node running the product's images, whose pods reach the
    broker; or an existing cluster named by AUTOREDUCE_TEST_KUBECONFIG."""
    ports = (broker.port,) if isinstance(broker, ActiveMQ) else ()
    stack = start_local_stack(workdir=session_dir / "kube", host_ports=ports)
    yield stack
    stack.stop()


@pytest.fixture
def namespace(kube: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.create_namespace(name)
    yield name
    kube.delete_namespace(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "golden: compares against files in tests/unit/golden")


# -- the product on the stack ------------------------------------------------------


@pytest.fixture
def facility(tmp_path: Path) -> Facility:
    return Facility(tmp_path / "facility").create()


@pytest.fixture(scope="session")
def runner_uid() -> int:
    return RUNNER_UID


@pytest.fixture
def batch(kube: Any) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(kube.api_client())


@pytest.fixture
def start_dispatcher(
    kube: Any, namespace: str, broker: ActiveMQ | ExistingBroker,
    broker_settings: BrokerSettings, facility: Facility, tmp_path: Path, runner_uid: int,
) -> Iterator[Callable[..., DispatcherProcess]]:
    """Start dispatcher processes on this test's namespace and queues, connecting as
    the dispatcher's broker identity, their runner pods as the runners'."""
    identities = broker
    core = k8s.CoreV1Api(kube.api_client())
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": "autoreduce-broker"},
        "stringData": {"password": identities.runner.password},
    })
    ca_bundle = broker_ca_bundle(broker_settings)
    if ca_bundle is not None:
        core.create_namespaced_config_map(namespace, ca_bundle)
    started: list[DispatcherProcess] = []

    def start(
        name: str = "dispatcher", *, kubeconfig: Path | None = None,
        broker: BrokerSettings | None = None, identity: Identity | None = None,
        **overrides: Any,
    ) -> DispatcherProcess:
        """``kubeconfig``: the dispatcher's credentials (the admin's by default);
        ``broker``: how it reaches the broker (the test's own settings by default);
        ``identity``: its broker user (the dispatcher's by default)."""
        who = identity or identities.dispatcher
        password = tmp_path / f"broker-password-{who.user}"
        password.write_text(who.password)
        settings = dispatcher_settings(
            broker=identities.settings_for(who, broker or broker_settings),
            password_file=password, runner_username=identities.runner.user,
            namespace=namespace, facility=facility, run_as_user=runner_uid,
            runner_image=kube.image("autoreduce-runner"), **overrides,
        )
        proc = DispatcherProcess(workdir=tmp_path / "dispatchers", settings=settings,
                                 kubeconfig=kubeconfig or kube.kubeconfig, name=name).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        if proc.process is not None and proc.process.returncode not in (0, None, -9):
            print(proc.log()[-5000:])

"""A real ActiveMQ Classic broker (Debian's package) run as a plain Java process.

The Debian wrapper forces a 512 MB heap and a fixed base dir, so we start the
broker's own launcher jar with our config: STOMP (stomp+ssl when given TLS
material: the suite's default) on a free port of the host's address,
``schedulerSupport`` (so AMQ_SCHEDULED_DELAY works), JAAS authentication from
properties files it reloads (passwords rotate live), the ``authorizationPlugin`` with
the product's grants, and KahaDB in the given directory so a restart keeps
persistent messages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from xml.sax.saxutils import escape

from autoreduce_common.broker_grants import (
    DISPATCHER_GROUP,
    RUNNER_GROUP,
    authorization_entries,
    grants,
)
from autoreduce_common.broker_settings import BrokerSettings, QueueNames, TlsSettings
from pydantic import SecretStr

from devstack.broker_tls import BrokerTls
from devstack.errors import StackStartError
from devstack.node import host_address
from devstack.process import die_with_parent

ACTIVEMQ_JAR = Path("/usr/share/activemq/bin/activemq.jar")
ACTIVEMQ_HOME = Path("/usr/share/activemq")
LOG4J_CONF = Path("/etc/activemq/instances-available/main/log4j2.properties")

_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<beans xmlns="http://www.springframework.org/schema/beans"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="http://www.springframework.org/schema/beans
         http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
         http://activemq.apache.org/schema/core
         http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="autoreduce-test"
          useJmx="false" schedulerSupport="true" persistent="true"
          dataDirectory="{data}" schedulerDirectory="{data}/scheduler">
    <destinationPolicy>
      <policyMap>
        <policyEntries>
          <!-- JMS priority (run detection 9, manual 1, reruns 0) must order delivery. -->
          <policyEntry queue=">" prioritizedMessages="true" useCache="false"
                       expireMessagesPeriod="0"/>
        </policyEntries>
      </policyMap>
    </destinationPolicy>
    <plugins>
      <!-- Users and groups in properties files the broker reads again when they
           change (reload=true): a password can be rotated without a restart. -->
      <jaasAuthenticationPlugin configuration="autoreduce"/>
      <authorizationPlugin>
        <map>
          <authorizationMap>
            <authorizationEntries>
              <!-- The suite's own identity (it plays the web app and run detection). -->
              <authorizationEntry queue=">" read="admins" write="admins" admin="admins"/>
              <authorizationEntry topic=">" read="admins" write="admins" admin="admins"/>
              <!-- The product's two identities, as the README tells a broker admin. -->
{grants}
            </authorizationEntries>
          </authorizationMap>
        </map>
      </authorizationPlugin>
    </plugins>
    <persistenceAdapter>
      <kahaDB directory="{data}/kahadb"/>
    </persistenceAdapter>
    <systemUsage>
      <systemUsage>
        <memoryUsage><memoryUsage limit="64 mb"/></memoryUsage>
        <storeUsage><storeUsage limit="2 gb"/></storeUsage>
        <tempUsage><tempUsage limit="512 mb"/></tempUsage>
      </systemUsage>
    </systemUsage>
{ssl_context}    <transportConnectors>
      <transportConnector name="stomp"
          uri="{scheme}://{address}:{port}?transport.closeAsync=false"/>
    </transportConnectors>
  </broker>
</beans>
"""


_SSL_CONTEXT = """    <sslContext>
      <sslContext keyStore="file:{keystore}" keyStorePassword="{password}"
                  keyStoreType="pkcs12"/>
    </sslContext>
"""


_LOGIN_CONFIG = """autoreduce {
    org.apache.activemq.jaas.PropertiesLoginModule required
        org.apache.activemq.jaas.properties.user="users.properties"
        org.apache.activemq.jaas.properties.group="groups.properties"
        reload=true;
};
"""


class BrokerStartError(StackStartError):
    """The broker did not come up; the message says why and where its log is."""


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def stomp_answers(address: str, port: int, *, user: str, password: str,
                  tls: BrokerTls | None = None) -> bool:  # fmt: skip
    """True when a STOMP CONNECT on ``address:port`` gets CONNECTED back."""
    try:
        with socket.create_connection((address, port), timeout=2) as raw:
            sock = raw
            if tls is not None:
                # Whether the JVM answers, not whether its certificate is good: the
                # tests of bad certificates start brokers that serve one on purpose.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                sock = ctx.wrap_socket(raw, server_hostname=address)
            frame = (
                f"CONNECT\naccept-version:1.2\nhost:localhost\nlogin:{user}\n"
                f"passcode:{password}\n\n\x00"
            )
            sock.sendall(frame.encode())
            reply = sock.recv(4096)
            sock.sendall(b"DISCONNECT\n\n\x00")
            return reply.startswith(b"CONNECTED")
    except OSError:
        return False


@dataclass(frozen=True)
class Identity:
    """A broker user (JAAS ``PropertiesLoginModule``: users.properties, groups.properties)."""

    user: str
    password: str
    groups: tuple[str, ...]


def _broker_grants() -> str:
    """The product's grants on the legacy queue names and on every per-test copy of
    them (``<name>.t<tag>``, tests/conftest.py ``queues``)."""
    entries = grants(QueueNames()) + grants(QueueNames(), suffix=".>")
    return authorization_entries(entries, indent=" " * 14)


@dataclass
class ActiveMQ:
    """One broker process; ``restart`` keeps its KahaDB, so persistent messages survive.

    Three identities, under ActiveMQ's authorizationPlugin: ``user`` (the suite's own,
    every right: it plays run detection and the web app), ``dispatcher`` and ``runner``
    (the product's two, with the grants of autoreduce_common.broker_grants).
    """

    workdir: Path
    port: int
    user: str = "admin"
    password: str = "test-password"  # noqa: S105 - a throwaway local broker's
    dispatcher: Identity = Identity("autoreduce", "dispatcher-password", (DISPATCHER_GROUP,))
    runner: Identity = Identity("autoreduce-runner", "runner-password", (RUNNER_GROUP,))
    heap_mb: int = 256
    # The host's own address, not loopback: pods on the stack's nodes reach it there
    # through a relay (devstack.node), and host processes use the same broker URL.
    address: str = field(default_factory=host_address)
    # The connector is stomp+ssl with this keystore when set (the suite's default),
    # plain STOMP otherwise.
    tls: BrokerTls | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def client_tls(self) -> TlsSettings:
        """What a client of this broker sets: TLS on, trusting the broker's own CA."""
        if self.tls is None:
            return TlsSettings()
        return TlsSettings(enabled=True, ca_file=self.tls.ca.cert)

    def identities(self) -> tuple[Identity, ...]:
        return (Identity(self.user, self.password, ("admins",)), self.dispatcher, self.runner)

    def settings_for(self, identity: Identity, base: BrokerSettings) -> BrokerSettings:
        """``base`` (hosts, queues, TLS) as ``identity`` connects."""
        return base.model_copy(update={"username": identity.user,
                                       "password": SecretStr(identity.password)})

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    def _write_config(self) -> Path:
        conf = self.workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        text = _CONFIG.format(
            data=escape(str(self.workdir / "data")),
            grants=_broker_grants(),
            address=self.address, port=self.port,
            scheme="stomp+ssl" if self.tls else "stomp",
            ssl_context=_SSL_CONTEXT.format(
                keystore=escape(str(self.tls.keystore)),
                password=escape(self.tls.keystore_password)) if self.tls else "",
        )
        (conf / "activemq.xml").write_text(text)
        (conf / "login.config").write_text(_LOGIN_CONFIG)
        self._write_users(conf)
        if LOG4J_CONF.exists():
            shutil.copy(LOG4J_CONF, conf / "log4j2.properties")
        return conf

    def _write_users(self, conf: Path) -> None:
        """users.properties and groups.properties, each replaced in one rename so the
        broker never reads half a file."""
        identities = self.identities()
        users = "".join(f"{i.user}={i.password}\n" for i in identities)
        members: dict[str, list[str]] = {}
        for identity in identities:
            for group in identity.groups:
                members.setdefault(group, []).append(identity.user)
        groups = "".join(f"{group}={','.join(names)}\n" for group, names in members.items())
        for name, text in (("groups.properties", groups), ("users.properties", users)):
            scratch = conf / f".{name}.new"
            scratch.write_text(text)
            scratch.chmod(0o600)
            scratch.replace(conf / name)

    def rotate(self, which: str, password: str) -> Identity:
        """Give the ``dispatcher`` or ``runner`` identity a new password, live: the
        broker reads users.properties again at the next login (connections already
        open stay). Returns the identity as it is now."""
        if which not in ("dispatcher", "runner"):
            raise ValueError(f"no identity {which!r}")
        identity: Identity = replace(getattr(self, which), password=password)
        setattr(self, which, identity)
        self._write_users(self.workdir / "conf")
        return identity

    def start(self, *, timeout: float = 90.0) -> None:
        if not ACTIVEMQ_JAR.exists():
            raise BrokerStartError(
                f"ActiveMQ is not installed ({ACTIVEMQ_JAR} missing): apt-get install activemq"
            )
        java = shutil.which("java")
        if java is None:
            raise BrokerStartError("no java on PATH: apt-get install default-jre-headless")
        conf = self._write_config()
        argv = [
            java,
            f"-Xms{min(64, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={self.workdir}",
            f"-Dactivemq.conf={conf}",
            f"-Dactivemq.data={self.workdir / 'data'}",
            # PropertiesLoginModule finds users.properties beside this file.
            f"-Djava.security.auth.login.config={conf / 'login.config'}",
            f"-Dlog4j2.configurationFile={conf / 'log4j2.properties'}",
            "-jar",
            str(ACTIVEMQ_JAR),
            "start",
            f"xbean:file:{conf / 'activemq.xml'}",
        ]
        log = self.log_path.open("ab")
        # A session of its own (a terminal's Ctrl-C reaches only the caller, who stops
        # it in order), and SIGTERM when the caller dies without stopping it: the JVM
        # must never outlive the stack that started it.
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509
        )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerStartError(
                    f"ActiveMQ exited with {self.process.returncode} while starting; "
                    f"see {self.log_path}:\n{self._log_tail()}"
                )
            if stomp_answers(self.address, self.port, user=self.user, password=self.password,
                             tls=self.tls):
                return
            time.sleep(0.3)
        self.stop()
        raise BrokerStartError(
            f"ActiveMQ did not answer STOMP on {self.host} within {timeout:.0f}s; "
            f"see {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def restart(self, *, sig: int = signal.SIGTERM) -> None:
        self.stop(sig=sig)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections hang instead of closing (fault tests)."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)

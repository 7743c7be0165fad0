"""Where our credentials come from (read again on a 401)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config


@dataclass(frozen=True)
class Credentials:
    """Where our credentials are read from, so that a 401 can read them again."""

    source: str  # for the log: the kubeconfig, or the in-cluster token file
    load: Callable[[], client.Configuration]  # reads them from disk on each call


def _configuration(kubeconfig: Path | None) -> client.Configuration:
    """Credentials as they are on disk now: in-cluster when ``kubeconfig`` is None."""
    configuration = client.Configuration()
    if kubeconfig is None:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        # A kubeconfig's tokenFile is read here, once: re-loading is how it is re-read.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
    # Enough pooled connections for the dispatch workers, the watch and probes.
    configuration.connection_pool_maxsize = 32
    # No hidden urllib3 retries: a failed call surfaces at once as Unavailable and
    # our callers retry (the message stays unacked). With urllib3's default 3
    # retries a frozen apiserver held a worker 4 x 30 s per call, and a readiness
    # probe outlived its own timeout (found by tests/faults).
    configuration.retries = False
    return configuration


def _identity(configuration: client.Configuration) -> tuple[Any, ...]:
    """What a request authenticates with: equal means re-reading changed nothing."""
    c = configuration
    return (c.host, sorted(c.api_key.items()), sorted(c.api_key_prefix.items()),
            c.cert_file, c.key_file, c.ssl_ca_cert, c.username, c.password)  # fmt: skip


def _credentials_for(kubeconfig: Path | None) -> Credentials:
    """In-cluster (the token file the kubelet rewrites) or the kubeconfig (and any
    tokenFile it names): read when connecting, and again on a 401."""
    source = str(kubeconfig) if kubeconfig is not None else "the in-cluster token file"
    return Credentials(source=source, load=lambda: _configuration(kubeconfig))

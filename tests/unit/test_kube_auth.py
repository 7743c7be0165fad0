"""A 401 re-reads our credentials and retries; one that persists is Unavailable.

The mapping is a pure function. The re-read goes through our real ``Kube`` and the
real client against a small local HTTP endpoint that answers like an API server
whose accepted token we choose: the kubeconfig names a ``tokenFile``, which is what
a projected ServiceAccount token is (the kubelet rewrites it; old tokens expire).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dispatcher.kube import Forbidden, Kube, KubeError, Unauthorized, Unavailable
from dispatcher.kube.errors import _map_status

UNAUTHORIZED = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "Unauthorized", "reason": "Unauthorized", "code": 401})


def test_401_maps_to_unauthorized_which_is_unavailable_not_a_bare_error() -> None:
    error = _map_status(401, UNAUTHORIZED.encode(), "create Job red-x")
    assert isinstance(error, Unauthorized)
    assert isinstance(error, Unavailable)  # what callers already treat as "try later"
    assert error.status == 401
    assert "create Job red-x: API server rejected our credentials (401)" in str(error)


@pytest.mark.parametrize("status", [403, 404, 409, 500])
def test_other_statuses_are_not_unauthorized(status: int) -> None:
    error = _map_status(status, b"{}", "get Job x")
    assert not isinstance(error, Unauthorized)
    if status == 403:
        assert isinstance(error, Forbidden) and not isinstance(error, Unavailable)


class ApiStub(ThreadingHTTPServer):
    """Answers GETs for a bearer ``token`` it accepts, 401 for any other; counts calls."""

    token = "first"
    requests = 0


class Handler(BaseHTTPRequestHandler):
    server: ApiStub

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.headers.get("Authorization") == f"Bearer {self.server.token}":
            self._reply(200, json.dumps({"metadata": {"name": "cm"}, "data": {}}))
        else:
            self._reply(401, UNAUTHORIZED)

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def api() -> Iterator[ApiStub]:
    server = ApiStub(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("first")
    return path


@pytest.fixture
def kube(api: ApiStub, token_file: Path, tmp_path: Path) -> Kube:
    host, port = api.server_address[:2]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": f"http://{host!s}:{port}"}}],
        "users": [{"name": "sa", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "sa"}}],
    }))  # fmt: skip
    return Kube.connect(kubeconfig=kubeconfig, namespace="ns", qps=1000, burst=1000)


def test_a_rotated_token_is_read_again_and_the_call_succeeds(
    api: ApiStub, token_file: Path, kube: Kube
) -> None:
    assert kube.get_config_map("cm") is not None
    api.token = "second"  # the old token is no longer accepted...
    token_file.write_text("second")  # ...and the file holds its successor
    api.requests = 0
    assert kube.get_config_map("cm") is not None
    assert api.requests == 2  # refused once, then accepted with the token re-read
    api.requests = 0
    assert kube.get_config_map("cm") is not None
    assert api.requests == 1  # the new token is kept


def test_a_401_that_persists_after_re_reading_is_unauthorized_and_said_once(
    api: ApiStub, token_file: Path, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    api.token = "second"  # the file still holds the old one
    api.requests = 0
    with caplog.at_level(logging.INFO, logger="dispatcher.kube"):
        for _ in range(3):
            with pytest.raises(Unauthorized) as refused:
                kube.get_config_map("cm")
            assert type(refused.value) is not KubeError
        assert not kube.healthy()  # readiness: the API cannot be used by us
        # The same credentials are never sent twice for one call.
        assert api.requests == 4
        said = [r for r in caplog.records if "rejected our credentials (401)" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.ERROR
        token_file.write_text("second")
        assert kube.get_config_map("cm") is not None
        assert kube.healthy()
    assert any("accepts our credentials again" in r.getMessage() for r in caplog.records)


def test_a_credentials_file_that_cannot_be_read_keeps_the_old_and_is_unauthorized(
    api: ApiStub, token_file: Path, kube: Kube
) -> None:
    api.token = "second"
    token_file.unlink()  # mid-rotation, say
    with pytest.raises(Unauthorized):
        kube.get_config_map("cm")
    token_file.write_text("second")
    assert kube.get_config_map("cm") is not None

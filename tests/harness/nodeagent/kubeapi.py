"""Thin JSON-over-HTTP access to the apiserver, with plain dicts.

The agent reads and writes pods as the apiserver's JSON (camelCase, as in YAML),
which keeps the kubelet logic readable and skips model (de)serialisation. The
``kubernetes`` client only supplies the kubeconfig handling and TLS pool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import config as kube_config
from kubernetes.client import ApiClient
from kubernetes.watch.watch import iter_resp_lines

Obj = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer; ``status`` 0 means the apiserver could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Api:
    def __init__(self, kubeconfig: str) -> None:
        self.client: ApiClient = kube_config.new_client_from_config(config_file=kubeconfig)
        # Every pod worker, the watch and the log server share this pool.
        self.client.configuration.connection_pool_maxsize = 64
        self.client.rest_client.pool_manager.connection_pool_kw["maxsize"] = 64

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 15.0,
        stream: bool = False,
    ) -> Any:
        _, url, headers, _, _ = self.client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"],
        )
        data = None if body is None else json.dumps(body).encode()
        try:
            resp = self.client.rest_client.pool_manager.request(
                method,
                url,
                body=data,
                headers=headers,
                timeout=urllib3.Timeout(connect=5.0, read=timeout),
                preload_content=not stream,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, str(exc)) from exc
        if resp.status >= 300:
            text = resp.data.decode(errors="replace") if not stream else resp.read().decode()
            raise ApiError(resp.status, _status_message(text))
        if stream:
            return resp
        return json.loads(resp.data) if resp.data else None

    def get(self, path: str, **query: Any) -> Obj:
        return dict(self.request("GET", path, query=query))

    def post(self, path: str, body: Obj, **query: Any) -> Obj:
        return dict(self.request("POST", path, body=body, query=query))

    def patch(self, path: str, body: Obj, *, kind: str = "strategic-merge-patch") -> Obj:
        return dict(self.request("PATCH", path, body=body, content_type=f"application/{kind}+json"))

    def put(self, path: str, body: Obj) -> Obj:
        return dict(self.request("PUT", path, body=body))

    def delete(self, path: str, body: Obj | None = None) -> None:
        self.request("DELETE", path, body=body or {})

    def watch(self, path: str, *, resource_version: str, timeout_s: int = 290) -> Iterator[Obj]:
        """Watch events from ``resource_version``; raises ApiError(410) when it is too old."""
        resp = self.request(
            "GET",
            path,
            query={
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": timeout_s,
            },
            timeout=timeout_s + 30,
            stream=True,
        )
        try:
            for line in iter_resp_lines(resp):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    obj = event.get("object", {})
                    raise ApiError(int(obj.get("code", 500)), str(obj.get("message")))
                yield event
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(0, str(exc)) from exc
        finally:
            resp.release_conn()


def _status_message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))
    except ValueError:
        return text[:500]


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    base = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
    return f"{base}/{sub}" if sub else base

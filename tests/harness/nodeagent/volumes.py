"""Materialise a pod's volumes as host paths, ready to bind-mount.

configMap, secret, downwardAPI and projected volumes are written once when the pod
starts (no later refresh; projected tokens are not rotated). emptyDir is a fresh
world-writable folder under the pod's directory. hostPath and PVCs bound to a
hostPath/local PV are the host paths themselves.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.nodeagent.kubeapi import Api, ApiError
from tests.harness.nodeagent.podspec import field_value, resource_value

Obj = dict[str, Any]
DEFAULT_MODE = 0o644
# Kinds the kubelet always mounts read-only, whatever the volumeMount says.
READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")


class VolumeNotReady(Exception):
    """A source is missing (ConfigMap, Secret, PVC binding): retry later, like FailedMount."""


@dataclass(frozen=True)
class Volume:
    path: Path
    kind: str


def _write(base: Path, rel: str, data: bytes, mode: int) -> None:
    target = base / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def _keyed(base: Path, data: dict[str, bytes], src: Obj, *, what: str, default_mode: int) -> None:
    """configMap/secret payload: all keys, or only ``items`` (key -> path, mode)."""
    items = src.get("items")
    if not items:
        for key, value in data.items():
            _write(base, key, value, default_mode)
        return
    for item in items:
        if item["key"] not in data:
            if src.get("optional"):
                continue
            raise VolumeNotReady(f'{what}: key "{item["key"]}" not found')
        _write(base, item["path"], data[item["key"]], item.get("mode", default_mode))


def _configmap_data(api: Api, namespace: str, name: str, optional: bool) -> dict[str, bytes]:
    try:
        cm = api.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    except ApiError as exc:
        if exc.status == 404 and optional:
            return {}
        raise VolumeNotReady(f'configmap "{name}" not found: {exc.message}') from exc
    data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return data


def _secret_data(api: Api, namespace: str, name: str, optional: bool) -> dict[str, bytes]:
    try:
        secret = api.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    except ApiError as exc:
        if exc.status == 404 and optional:
            return {}
        raise VolumeNotReady(f'secret "{name}" not found: {exc.message}') from exc
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def service_account_token(api: Api, pod: Obj, *, audience: str | None, seconds: int) -> str:
    meta = pod["metadata"]
    sa = pod["spec"].get("serviceAccountName") or "default"
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience] if audience else None,
            "expirationSeconds": seconds,
            "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"],
            },
        },
    }  # fmt: skip
    try:
        answer = api.post(
            f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body
        )
    except ApiError as exc:
        raise VolumeNotReady(f"token for serviceaccount {sa}: {exc.message}") from exc
    return str(answer["status"]["token"])


def _downward(
    base: Path, pod: Obj, items: list[Obj], *, default_mode: int, host_ip: str, capacity: Obj
) -> None:
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"], host_ip=host_ip)
        else:
            ref = item["resourceFieldRef"]
            container = containers.get(ref.get("containerName", ""), {})
            value = resource_value(container, ref, node_capacity=capacity)
        _write(base, item["path"], value.encode(), item.get("mode", default_mode))


def _projected(api: Api, base: Path, pod: Obj, src: Obj, *, host_ip: str, capacity: Obj) -> None:
    mode = src.get("defaultMode", DEFAULT_MODE)
    ns = pod["metadata"]["namespace"]
    for source in src.get("sources") or []:
        if "serviceAccountToken" in source:
            tok = source["serviceAccountToken"]
            token = service_account_token(
                api, pod, audience=tok.get("audience"), seconds=tok.get("expirationSeconds", 3600)
            )
            _write(base, tok["path"], token.encode(), mode)
        elif "configMap" in source:
            cm = source["configMap"]
            data = _configmap_data(api, ns, cm["name"], bool(cm.get("optional")))
            _keyed(base, data, cm, what=f"configmap {cm['name']}", default_mode=mode)
        elif "secret" in source:
            sec = source["secret"]
            data = _secret_data(api, ns, sec["name"], bool(sec.get("optional")))
            _keyed(base, data, sec, what=f"secret {sec['name']}", default_mode=mode)
        elif "downwardAPI" in source:
            items = source["downwardAPI"].get("items") or []
            _downward(base, pod, items, default_mode=mode, host_ip=host_ip, capacity=capacity)


def _host_path(src: Obj) -> Path:
    path = Path(src["path"])
    kind = src.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise VolumeNotReady(f"hostPath type check failed: {path} is not a directory")
    elif kind == "File" and not path.is_file():
        raise VolumeNotReady(f"hostPath type check failed: {path} is not a file")
    return path


def _pvc_path(api: Api, namespace: str, claim: str) -> Path:
    try:
        pvc = api.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    except ApiError as exc:
        raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from exc
    volume = (pvc.get("spec") or {}).get("volumeName")
    if not volume or (pvc.get("status") or {}).get("phase") != "Bound":
        raise VolumeNotReady(f'persistentvolumeclaim "{claim}" is not bound')
    pv = api.get(f"/api/v1/persistentvolumes/{volume}")
    spec = pv.get("spec") or {}
    source = spec.get("hostPath") or spec.get("local")
    if not source:
        raise VolumeNotReady(f"persistentvolume {volume} is neither hostPath nor local")
    path = Path(source["path"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(api: Api, pod: Obj, pod_dir: Path, *, host_ip: str, capacity: Obj) -> dict[str, Volume]:
    """Every volume of ``pod`` as a host path; raises VolumeNotReady to retry later."""
    ns = pod["metadata"]["namespace"]
    volumes: dict[str, Volume] = {}
    for vol in pod["spec"].get("volumes") or []:
        name = vol["name"]
        base = pod_dir / "volumes" / name
        if "hostPath" in vol:
            volumes[name] = Volume(_host_path(vol["hostPath"]), "hostPath")
            continue
        if "persistentVolumeClaim" in vol:
            path = _pvc_path(api, ns, vol["persistentVolumeClaim"]["claimName"])
            volumes[name] = Volume(path, "persistentVolumeClaim")
            continue
        base.mkdir(parents=True, exist_ok=True)
        kind = _fill(api, base, pod, vol, host_ip=host_ip, capacity=capacity)
        # Non-root containers must be able to traverse and (for emptyDir) write.
        os.chmod(base, 0o777 if kind == "emptyDir" else 0o755)
        volumes[name] = Volume(base, kind)
    return volumes


def _fill(api: Api, base: Path, pod: Obj, vol: Obj, *, host_ip: str, capacity: Obj) -> str:
    ns = pod["metadata"]["namespace"]
    if "configMap" in vol:
        src = vol["configMap"]
        data = _configmap_data(api, ns, src["name"], bool(src.get("optional")))
        mode = src.get("defaultMode", DEFAULT_MODE)
        _keyed(base, data, src, what=f"configmap {src['name']}", default_mode=mode)
        return "configMap"
    if "secret" in vol:
        src = vol["secret"]
        data = _secret_data(api, ns, src["secretName"], bool(src.get("optional")))
        mode = src.get("defaultMode", DEFAULT_MODE)
        _keyed(base, data, src, what=f"secret {src['secretName']}", default_mode=mode)
        return "secret"
    if "projected" in vol:
        _projected(api, base, pod, vol["projected"], host_ip=host_ip, capacity=capacity)
        return "projected"
    if "downwardAPI" in vol:
        src = vol["downwardAPI"]
        mode = src.get("defaultMode", DEFAULT_MODE)
        items = src.get("items") or []
        _downward(base, pod, items, default_mode=mode, host_ip=host_ip, capacity=capacity)
        return "downwardAPI"
    if "emptyDir" in vol:
        return "emptyDir"
    raise VolumeNotReady(f"volume {vol['name']}: unsupported volume type {sorted(vol)}")

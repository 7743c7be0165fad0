"""Pure kubelet logic on pod dicts: fitting, env, quantities, phases, conditions."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_quantity(text: str | int | float) -> Decimal:
    """Kubernetes quantity ("64Mi", "500m", "1e3") -> a number in base units."""
    value = str(text).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", value)
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"bad quantity {text!r}")
    return Decimal(match.group(1)) * Decimal(_SUFFIXES[match.group(2)])


# -- scheduling ----------------------------------------------------------------------


def tolerates(pod: Obj, taint: Obj) -> bool:
    for tol in pod["spec"].get("tolerations") or []:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _expression_holds(expr: Obj, labels: Mapping[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels:
        have, want = int(labels[key]), int(values[0])
        return have > want if op == "Gt" else have < want
    return False


def fits_node(pod: Obj, *, labels: Mapping[str, str], taints: list[Obj]) -> bool:
    """nodeSelector, required node affinity (matchExpressions) and NoSchedule taints."""
    spec = pod["spec"]
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if terms and not any(
        all(_expression_holds(e, labels) for e in t.get("matchExpressions") or []) for t in terms
    ):
        return False
    hard = [t for t in taints if t.get("effect") in ("NoSchedule", "NoExecute")]
    return all(tolerates(pod, t) for t in hard)


def wants_binding(pod: Obj) -> bool:
    spec, meta = pod["spec"], pod["metadata"]
    return (
        not spec.get("nodeName")
        and not meta.get("deletionTimestamp")
        and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
        and pod.get("status", {}).get("phase", "Pending") == "Pending"
        and not spec.get("schedulingGates")
    )


# -- env -----------------------------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z0-9]+)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: unknown refs stay as they are, ``$$`` -> ``$``."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(repl, text)


def field_value(pod: Obj, path: str, *, host_ip: str) -> str:
    """A downward-API ``fieldRef.fieldPath``."""
    meta, spec = pod["metadata"], pod["spec"]
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: meta["name"],
        "metadata.namespace": lambda: meta["namespace"],
        "metadata.uid": lambda: meta["uid"],
        "spec.nodeName": lambda: spec.get("nodeName", ""),
        "spec.serviceAccountName": lambda: spec.get("serviceAccountName", "default"),
        "status.podIP": lambda: host_ip,
        "status.podIPs": lambda: host_ip,
        "status.hostIP": lambda: host_ip,
        "status.hostIPs": lambda: host_ip,
        "metadata.labels": lambda: _format_map(meta.get("labels") or {}),
        "metadata.annotations": lambda: _format_map(meta.get("annotations") or {}),
    }
    if path in simple:
        return simple[path]()
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ValueError(f"unsupported fieldPath {path!r}")


def _format_map(values: Mapping[str, str]) -> str:
    return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))


def resource_value(container: Obj, ref: Obj, *, node_capacity: Mapping[str, str]) -> str:
    """A ``resourceFieldRef``: limits default to node capacity, rounded up by divisor."""
    kind, res = ref["resource"].split(".", 1)
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(res)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(res)
    if raw is None:
        raw = node_capacity.get(res, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


def memory_limit_bytes(container: Obj) -> int | None:
    raw = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return int(parse_quantity(raw)) if raw else None


# -- status --------------------------------------------------------------------------


def compute_phase(pod: Obj, *, init_done: bool, statuses: list[Obj], init_failed: bool) -> str:
    """The kubelet's getPhase: Pending, Running, Succeeded or Failed."""
    policy = pod["spec"].get("restartPolicy", "Always")
    if init_failed and policy == "Never":
        return "Failed"
    if not init_done:
        return "Pending"
    # A container waiting after a previous run (a restart) counts as stopped, not pending.
    if any("waiting" in s["state"] and not s.get("lastState") for s in statuses):
        return "Pending"
    if any("running" in s["state"] for s in statuses):
        return "Running"
    failed = any(s["state"].get("terminated", {}).get("exitCode", 0) != 0 for s in statuses)
    if policy == "Always" or (policy == "OnFailure" and failed):
        return "Running"
    return "Failed" if failed else "Succeeded"


def condition(kind: str, ok: bool, *, reason: str = "", message: str = "") -> Obj:
    cond: Obj = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now_rfc3339(),
    }
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def merge_conditions(old: list[Obj], new: list[Obj]) -> list[Obj]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = {c["type"]: c for c in old}
    merged = []
    for cond in new:
        prev = before.get(cond["type"])
        if prev and prev.get("status") == cond["status"]:
            merged.append({**cond, "lastTransitionTime": prev.get("lastTransitionTime")})
        else:
            merged.append(cond)
    return merged

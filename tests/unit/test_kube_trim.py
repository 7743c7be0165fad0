"""managedFields are cut from the API's JSON before decoding only when the object is
in the API server's shape; anything else is decoded whole."""

from __future__ import annotations

import json
from typing import Any

from dispatcher.kube.trim import without_managed_fields

MANAGED = [{"manager": "dispatcher", "operation": "Update", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:suspend": {}, "f:template": {"f:spec": {}}},
                         "f:metadata": {"f:labels": {".": {}, "k:{\"x\":\"]},\"}": {}}}}},
           {"manager": "kube-controller-manager", "subresource": "status",
            "fieldsV1": {"f:status": {"f:conditions": {}}}}]  # fmt: skip


def _job(name: str, *, note: str = "") -> dict[str, Any]:
    # Key order as the API server writes it: managedFields last in metadata, then spec.
    return {"metadata": {"name": name, "annotations": {"note": note}, "managedFields": MANAGED},
            "spec": {"suspend": True, "template": {"metadata": {"labels": {"a": "b"}},
                                                   "spec": {"containers": []}}},
            "status": {}}  # fmt: skip


def _bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _without(obj: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(obj))
    copy["metadata"].pop("managedFields")
    return copy


def test_a_page_decodes_as_itself_without_managed_fields() -> None:
    # A string may hold the very byte sequences the cut looks for: JSON escapes them.
    tricky = 'x,"managedFields":[ ]},"spec":{ "spec":'
    page = {"kind": "JobList", "metadata": {"continue": "c"},
            "items": [_job("a", note=tricky), _job("b")]}  # fmt: skip
    raw = _bytes(page)
    cut = without_managed_fields(raw)
    assert len(cut) < len(raw) / 2
    assert json.loads(cut) == {**page, "items": [_without(item) for item in page["items"]]}


def test_a_watch_event_is_cut_too() -> None:
    event = {"type": "MODIFIED", "object": _job("a")}
    assert json.loads(without_managed_fields(_bytes(event)))["object"] == _without(_job("a"))


def test_an_object_in_another_shape_is_left_whole() -> None:
    job = _job("a")
    job["metadata"] = {"name": "a", "managedFields": MANAGED, "labels": {}}  # not last
    odd = _bytes({"items": [job, _job("b")]})
    assert without_managed_fields(odd) == odd
    no_spec = _bytes({"metadata": {"name": "cm", "managedFields": MANAGED}, "data": {}})
    assert without_managed_fields(no_spec) == no_spec
    plain = _bytes({"metadata": {"name": "a"}, "spec": {}})
    assert without_managed_fields(plain) == plain

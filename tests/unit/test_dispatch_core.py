"""Naming, rendering and admission decisions: pure functions on plain values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from autoreduce_common.messages import parse_run

from dispatcher import admission, pods
from dispatcher.config import DispatcherSettings, InstrumentOverrides, load_settings
from dispatcher.identity import MAX_NAME, Labels, RunKey, job_name, lease_name, run_key
from dispatcher.manifests import (
    Arrival,
    TemplateError,
    carries_message,
    effective_runner,
    inline_message,
    load_template,
    message_of,
    owned_by,
    render_config_map,
    render_job,
    stored_message,
)

GOLDEN = Path(__file__).parent / "golden"
LABELS = Labels("autoreduce.io")


def key(**overrides: Any) -> RunKey:
    values: dict[str, Any] = {
        "facility": "ISIS", "instrument": "WISH", "runs": (12345,), "version": 0,
        "rb_number": "1234567",
    }
    values.update(overrides)
    return RunKey(**values)


def test_job_name_is_deterministic_and_fits() -> None:
    assert job_name(key()) == job_name(key())
    assert job_name(key()) != job_name(key(version=1))
    assert job_name(key()) != job_name(key(runs=(12345, 12346)))
    long = key(instrument="A" * 40, runs=(10**12,), version=9999)
    assert len(job_name(long)) <= MAX_NAME
    assert job_name(key()).startswith("red-wish-12345-v0-")


def test_run_key_from_message_sorts_batches() -> None:
    body = {"data": "/d", "instrument": "wish", "rb_number": 7, "run_number": [3, 1, 2],
            "reduction_script": "x", "reduction_arguments": {}}
    _, message = parse_run(json.dumps(body))
    assert run_key(message).runs == (1, 2, 3)
    assert lease_name("ABC123") == "rb-abc123"


def _settings(**overrides: Any) -> DispatcherSettings:
    return DispatcherSettings.model_validate(overrides)


def test_instrument_overrides_merge_over_defaults() -> None:
    settings = _settings(
        runner={"env": {"A": "1"}},
        instruments={"wish": InstrumentOverrides(image="mantid:6.9", env={"B": "2"})},
    )
    runner = effective_runner(settings, "WISH")
    assert runner.image == "mantid:6.9"
    assert runner.env == {"A": "1", "B": "2"}
    assert effective_runner(settings, "LET").image == settings.runner.image


def render(settings: DispatcherSettings, run: RunKey) -> dict[str, Any]:
    template = load_template(settings.jobs.template_path)
    return render_job(settings=settings, template=template, key=run,
                      arrival=Arrival(priority=9, enqueued_ms=1000, message_id="ID:1"))


def test_default_template_matches_golden_file(request: pytest.FixtureRequest) -> None:
    settings = _settings(
        runner={"archive_volumes": [{"name": "archive", "mount_path": "/archive",
                                     "source": {"hostPath": {"path": "/srv/archive"}}}],
                "output_volumes": [{"name": "output", "mount_path": "/output",
                                    "source": {"persistentVolumeClaim": {"claimName": "out"}}}]},
    )
    rendered = yaml.safe_dump(render(settings, key()), sort_keys=True)
    update = bool(request.config.getoption("--update-golden", default=False))
    check_golden(GOLDEN / "job-default.yaml", rendered, update=update)


def check_golden(golden: Path, rendered: str, *, update: bool) -> None:
    """Compare with the golden file; only ``update`` (--update-golden) writes it.

    A missing file fails: writing it here would let a deleted golden file pass."""
    if update:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} is missing: run pytest with --update-golden to write it"
    assert rendered == golden.read_text(), "rerun with --update-golden if the change is intended"


def test_a_missing_golden_file_fails_and_only_update_writes_it(tmp_path: Path) -> None:
    golden = tmp_path / "golden" / "job.yaml"
    with pytest.raises(AssertionError, match="--update-golden"):
        check_golden(golden, "rendered\n", update=False)
    assert not golden.exists()
    check_golden(golden, "rendered\n", update=True)
    assert golden.read_text() == "rendered\n"
    check_golden(golden, "rendered\n", update=False)
    with pytest.raises(AssertionError, match="--update-golden"):
        check_golden(golden, "changed\n", update=False)


def test_job_properties_the_design_relies_on() -> None:
    job = render(_settings(), key())
    spec = job["spec"]
    assert spec["suspend"] is True and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["metadata"]["labels"]["autoreduce.io/rb-number"] == "1234567"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "AUTOREDUCE_BROKER__PASSWORD" not in env  # credentials only via the Secret


def test_hostile_strings_stay_values(tmp_path: Path) -> None:
    settings = _settings(runner={"env": {"X": "a\"\nkind: Secret\n{{ 1 }}"}})
    job = render(settings, key())
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["X"] == "a\"\nkind: Secret\n{{ 1 }}"
    assert job["kind"] == "Job"


def test_broken_template_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml.j2"
    path.write_text("kind: Job\nmetadata: {name: {{ job.nmae }}}\n")
    with pytest.raises(TemplateError, match="nmae"):
        render(_settings(jobs={"template_path": path}), key())
    path.write_text("kind: Pod\n")
    with pytest.raises(TemplateError, match="single batch/v1 Job"):
        render(_settings(jobs={"template_path": path}), key())


def test_config_map_carries_message_and_is_owned() -> None:
    raw = {"a": 1, "unknown": [1]}
    cm = owned_by(render_config_map(settings=_settings(), key=key(), raw=raw),
                  job_uid="uid-1", job=job_name(key()))
    assert json.loads(cm["data"]["message.json"]) == raw
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_message_is_read_back_from_its_config_map() -> None:
    raw = {"instrument": "WISH", "run_number": 1, "unknown": ["kept"], "note": "\U0001f600"}
    assert message_of(render_config_map(settings=_settings(), key=key(), raw=raw)) == raw


@pytest.mark.parametrize("config_map", [
    None,  # gone with its Job
    {"data": None},
    {"data": {}},
    {"data": {"message.json": ""}},
    {"data": {"message.json": "not json"}},
    {"data": {"message.json": "[1, 2]"}},  # JSON, but not a message
    {"data": {"other.json": "{}"}},
])
def test_a_config_map_without_a_message_reads_as_none(config_map: dict[str, Any] | None) -> None:
    assert message_of(config_map) is None


def render_with(settings: DispatcherSettings, raw: dict[str, Any],
                template: Path | None = None) -> dict[str, Any]:
    return render_job(settings=settings, template=load_template(
                          template or settings.jobs.template_path), key=key(),
                      arrival=Arrival(priority=4, enqueued_ms=1000, message_id="ID:1"),
                      message=inline_message(settings, raw))


def message_volume(job: dict[str, Any]) -> dict[str, Any]:
    volumes = job["spec"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == "message")


def test_a_small_message_travels_in_the_job_and_is_projected_as_the_message_file() -> None:
    raw = {"instrument": "WISH", "reduction_script": "print('\u00e9')\n", "note": "\U0001f600"}
    job = render_with(_settings(), raw)
    annotation = job["spec"]["template"]["metadata"]["annotations"]["autoreduce.io/message"]
    assert json.loads(annotation) == raw
    assert message_volume(job) == {"name": "message", "downwardAPI": {"items": [{
        "path": "message.json",
        "fieldRef": {"fieldPath": "metadata.annotations['autoreduce.io/message']"}}]}}
    assert carries_message(LABELS, job)
    never_read = lambda: pytest.fail("the ConfigMap was read")  # noqa: E731
    assert stored_message(LABELS, job, never_read) == raw


def test_a_message_over_the_limit_goes_in_its_config_map() -> None:
    raw = {"instrument": "WISH", "reduction_script": "x" * 100}
    size = len(json.dumps(raw).encode())
    for limit in (0, size - 1):
        settings = _settings(jobs={"inline_message_max_bytes": limit})
        job = render_with(settings, raw)
        assert message_volume(job) == {"name": "message",
                                       "configMap": {"name": job_name(key())}}
        assert not carries_message(LABELS, job)
        assert "autoreduce.io/message" not in job["spec"]["template"]["metadata"]["annotations"]
        config_map = render_config_map(settings=settings, key=key(), raw=raw)
        assert stored_message(LABELS, job, lambda: config_map) == raw
    assert carries_message(LABELS, render_with(
        _settings(jobs={"inline_message_max_bytes": size}), raw))


def test_a_site_template_written_for_the_config_map_gets_the_inline_message(
        tmp_path: Path) -> None:
    path = tmp_path / "job.yaml.j2"
    default = Path(str(_settings().jobs.template_path)).read_text()
    path.write_text(default.replace('"configMap": {"name": {{ job.config_map | tojson }}}',
                                    '"configMap": {"name": {{ job.config_map | tojson }}, '
                                    '"defaultMode": 420}'))
    job = render_with(_settings(), {"instrument": "WISH"}, template=path)
    assert set(message_volume(job)) == {"name", "downwardAPI"}


def test_a_template_without_the_message_volume_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml.j2"
    path.write_text(Path(str(_settings().jobs.template_path)).read_text().replace(
        '- {"name": "message", "configMap"', '- {"name": "elsewhere", "configMap"'))
    with pytest.raises(TemplateError, match="pod volume 'message'"):
        render_with(_settings(), {"instrument": "WISH"}, template=path)


@pytest.mark.parametrize("job", [
    None,  # gone
    {"spec": {"template": {"metadata": {"annotations": {"autoreduce.io/message": "not json"}}}}},
    {"spec": {"template": {"metadata": {"annotations": {"autoreduce.io/message": "[1]"}}}}},
])
def test_an_unreadable_inline_message_reads_as_none(job: dict[str, Any] | None) -> None:
    assert stored_message(LABELS, job, lambda: None) is None


def test_settings_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("jobs: {namespace: facility}\nbroker: {hosts: 'a:1,b:2', username: u}\n")
    monkeypatch.setenv("AUTOREDUCE_BROKER__USERNAME", "from-env")
    settings = load_settings(config_file=path)
    assert settings.jobs.namespace == "facility"
    assert settings.broker.hosts == ["a:1", "b:2"]
    assert settings.broker.username == "from-env"
    path.write_text("jobz: {}\n")
    with pytest.raises(ValueError, match="jobz"):
        load_settings(config_file=path)


# -- admission -----------------------------------------------------------------------


def job(name: str, *, suspended: bool = True, finished: str | None = None,
        priority: int = 4, at: int = 0, instrument: str = "WISH") -> dict[str, Any]:
    conditions = [{"type": finished, "status": "True"}] if finished else []
    return {
        "metadata": {
            "name": name,
            "labels": {"autoreduce.io/instrument": instrument, "autoreduce.io/rb-number": "1"},
            "annotations": {"autoreduce.io/priority": str(priority),
                            "autoreduce.io/enqueued-at": str(at)},
        },
        "spec": {"suspend": suspended},
        "status": {"conditions": conditions},
    }


def test_next_waiting_is_priority_then_arrival() -> None:
    jobs = [job("a", at=1), job("b", at=0), job("c", at=5, priority=9)]
    assert admission.next_waiting(LABELS, jobs)["metadata"]["name"] == "c"
    assert admission.next_waiting(LABELS, jobs[:2])["metadata"]["name"] == "b"


def test_plan_keeps_a_running_holder() -> None:
    jobs = [job("run", suspended=False), job("wait")]
    plan = admission.plan_rb(labels=LABELS, holder="run", jobs=jobs, lease_exists=True)
    assert plan.action is admission.Action.KEEP


def test_occupant_is_the_running_job_only() -> None:
    running = job("run", suspended=False)
    done = job("done", suspended=False, finished="Complete")
    assert admission.occupant([job("wait"), done, running]) is running
    assert admission.occupant([job("wait"), done]) is None
    assert admission.occupant([]) is None


def test_plan_resumes_a_granted_but_suspended_holder() -> None:
    plan = admission.plan_rb(labels=LABELS, holder="wait", jobs=[job("wait")], lease_exists=True)
    assert plan.action is admission.Action.RESUME


@pytest.mark.parametrize("holder", ["finished", "gone", None])
def test_plan_hands_over_from_stale_or_missing_holder(holder: str | None) -> None:
    jobs = [job("finished", suspended=False, finished="Complete"), job("next")]
    plan = admission.plan_rb(labels=LABELS, holder=holder, jobs=jobs, lease_exists=bool(holder))
    assert plan.action is admission.Action.ADMIT
    assert plan.job is not None and plan.job["metadata"]["name"] == "next"


def test_plan_releases_when_nobody_waits() -> None:
    jobs = [job("done", suspended=False, finished="Failed")]
    assert admission.plan_rb(labels=LABELS, holder="done", jobs=jobs,
                             lease_exists=True).action is admission.Action.RELEASE
    assert admission.plan_rb(labels=LABELS, holder=None, jobs=[],
                             lease_exists=False).action is admission.Action.IDLE


def test_caps() -> None:
    running = [job("r1", suspended=False), job("r2", suspended=False, instrument="LET")]
    caps = admission.Caps(max_running=2, per_instrument={})
    assert not admission.caps_allow(labels=LABELS, caps=caps, job=job("n"), running=running)
    caps = admission.Caps(max_running=None, per_instrument={"WISH": 1})
    assert not admission.caps_allow(labels=LABELS, caps=caps, job=job("n"), running=running)
    assert admission.caps_allow(labels=LABELS, caps=caps, job=job("n", instrument="LET"),
                                running=running)


def test_expired_picks_jobs_older_than_the_ttl_oldest_first() -> None:
    def made(name: str, stamp: str | None) -> dict[str, object]:
        meta: dict[str, object] = {"name": name}
        if stamp is not None:
            meta["creationTimestamp"] = stamp
        return {"metadata": meta}

    now = admission.created_at(made("now", "2026-11-28T12:00:00Z"))
    assert now is not None
    jobs = [made("fresh", "2026-11-28T11:59:00Z"), made("day", "2026-11-27T11:00:00Z"),
            made("week", "2026-11-20T12:00:00Z"), made("odd", "not a time"), made("none", None)]
    old = admission.expired(jobs, now=now, ttl_s=3600)
    assert [j["metadata"]["name"] for j in old] == ["week", "day"]  # type: ignore[index]
    assert admission.expired(jobs, now=now, ttl_s=30 * 86400) == []


# -- when a Job's RB is really free ----------------------------------------------------


def _job_with(*conditions: str, terminating: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": "j"}, "spec": {},
            "status": {"terminating": terminating,
                       "conditions": [{"type": c, "status": "True"} for c in conditions]}}


def test_a_first_verdict_is_not_the_end_of_a_job() -> None:
    # FailureTarget / SuccessCriteriaMet come while the pods may still be stopping:
    # the RB stays held until the final condition.
    assert not admission.is_finished(_job_with("FailureTarget"))
    assert not admission.is_finished(_job_with("SuccessCriteriaMet"))
    assert admission.is_running(_job_with("FailureTarget"))
    assert admission.is_finished(_job_with("FailureTarget", "Failed"))
    assert admission.succeeded(_job_with("SuccessCriteriaMet", "Complete"))
    assert not admission.is_finished(_job_with("Failed", terminating=1))


def test_pod_view_reads_phase_rb_job_and_our_finalizer() -> None:
    labels = Labels("autoreduce.io")
    pod = {"metadata": {"name": "p", "finalizers": ["autoreduce.io/outcome"],
                        "deletionTimestamp": "2026-01-01T00:00:00Z",
                        "labels": {"autoreduce.io/rb-number": "7",
                                   "batch.kubernetes.io/job-name": "j"}},
           "status": {"phase": "Running"}}
    view = pods.pod_view(pod, labels=labels)
    assert (view.rb, view.job, view.live, view.deleting, view.finalized) == (
        "7", "j", True, True, True)
    pod["status"]["phase"] = "Failed"
    assert not pods.pod_view(pod, labels=labels).live
    assert pods.pod_view({}, labels=labels).live  # no status yet: Pending, may start


def test_pod_view_carries_why_a_pod_cannot_start() -> None:
    labels = Labels("autoreduce.io")
    pod = {"metadata": {"name": "p", "labels": {"batch.kubernetes.io/job-name": "j"}},
           "status": {"phase": "Pending", "containerStatuses": [
               {"name": "poster", "state": {"waiting": {
                   "reason": "ImagePullBackOff", "message": "no such image"}}}]}}
    assert pods.pod_view(pod, labels=labels).stuck == "ImagePullBackOff: no such image"
    pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    assert pods.pod_view(pod, labels=labels).stuck is None


def _view(name: str, *, rb: str, job: str, phase: str = "Running",
          stuck: str | None = None) -> pods.PodView:
    return pods.PodView(name=name, job=job, rb=rb, phase=phase, deleting=False,
                        finalized=True, stuck=stuck)


def test_pod_cache_lookups_by_rb_and_job_follow_upserts_and_removals() -> None:
    cache = pods.PodCache()
    cache.replace_all([_view("a", rb="1", job="ja"), _view("b", rb="2", job="jb")])
    assert [v.name for v in cache.live_of_rb("1")] == ["a"]
    cache.upsert(_view("a", rb="1", job="ja", phase="Succeeded"))
    assert cache.live_of_rb("1") == []  # stopped: no longer holds its RB
    assert [v.phase for v in cache.of_job("ja")] == ["Succeeded"]
    cache.upsert(_view("c", rb="2", job="jb", stuck="ErrImagePull"))
    assert sorted(v.name for v in cache.of_job("jb")) == ["b", "c"]
    assert [v.name for v in cache.of_job("jb") if v.stuck] == ["c"]
    cache.remove("b")
    cache.remove("c")
    cache.remove("nobody")
    assert cache.live_of_rb("2") == [] and cache.of_job("jb") == []
    assert [v.name for v in cache.all()] == ["a"]

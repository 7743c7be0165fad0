"""The Helm chart, rendered with `helm template` (no cluster): schema, settings, Job.

What rendering alone can prove: every ci values file lints and renders; the schema
rejects typos and wrong types; the rendered settings.yaml is a valid
``DispatcherSettings`` that points at the files the Deployment mounts; the Job
template the dispatcher would use (its built-in one, or the site's from the
ConfigMap) turns a run into a Job; RBAC is exactly what dispatcher/kube.py uses, for
the dispatcher and, in a Role of its own, for the operator CLI.
That the chart's values and settings agree with dispatcher/config.py is in
test_settings_schema.py; server-side validation of the same manifests is in
tests/integration/test_chart.py.
"""

from __future__ import annotations

import ast
import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from autoreduce_common import pod_contract
from autoreduce_common.broker_settings import TlsSettings

from dispatcher.config import DEFAULT_TEMPLATE, DispatcherSettings, load_settings
from dispatcher.identity import Labels, RunKey
from dispatcher.kube import Kube
from dispatcher.leases import lease_body
from dispatcher.manifests import Arrival, load_template, render_job
from tests.harness.tools import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "autoreduce"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "reduction"
RELEASE = "ar"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def render(
    *values_files: Path, sets: tuple[str, ...] = (), release: str = RELEASE
) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    out = helm(*args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def dispatcher_config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(docs, "Deployment")
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    return find(docs, "ConfigMap", volume["configMap"]["name"])


def load_rendered_settings(
    docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> DispatcherSettings:
    """settings.yaml through the dispatcher's own loader, with the mounted password
    file swapped for a local one by the env override the Deployment could use too."""
    text = dispatcher_config_map(docs)["data"]["settings.yaml"]
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(text)
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    monkeypatch.setenv("AUTOREDUCE_BROKER__PASSWORD_FILE", str(password))
    return load_settings(config_file=settings_file)


def ci_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def config_mount(docs: list[dict[str, Any]]) -> str:
    """Where the Deployment mounts the dispatcher ConfigMap."""
    (container,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return str(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config"))


def job_template_file(
    docs: list[dict[str, Any]], settings: DispatcherSettings, tmp_path: Path
) -> Path:
    """The Job template the dispatcher would load: a local copy of the ConfigMap's
    when settings point into its mount, else the one built into the image."""
    path = settings.jobs.template_path
    if path == DEFAULT_TEMPLATE:
        return path
    assert path.parent == Path(config_mount(docs)), f"{path} is not in the ConfigMap's mount"
    local = tmp_path / path.name
    local.write_text(dispatcher_config_map(docs)["data"][path.name])
    return local


# -- the Job template: the dispatcher's own unless the site sets one -------------------


def test_default_install_uses_the_job_template_built_into_the_dispatcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "default-values.yaml")
    assert set(dispatcher_config_map(docs)["data"]) == {"settings.yaml"}
    rendered = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    assert "template_path" not in rendered["jobs"]
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert settings.jobs.template_path == DEFAULT_TEMPLATE
    # No copy in the chart that could drift from the dispatcher's.
    copies = [
        p for p in CHART.rglob("*") if p.is_file() and DEFAULT_TEMPLATE.read_text() in p.read_text()
    ]
    assert not copies, f"the chart carries a copy of {DEFAULT_TEMPLATE.name}: {copies}"


def test_a_site_job_template_goes_into_the_config_map_and_settings_point_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values_file = CHART / "ci" / "custom-job-template-values.yaml"
    docs = render(values_file)
    data = dispatcher_config_map(docs)["data"]
    assert set(data) == {"settings.yaml", "job.yaml.j2"}
    assert data["job.yaml.j2"] == yaml.safe_load(values_file.read_text())["jobTemplate"]
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert str(settings.jobs.template_path) == f"{config_mount(docs)}/job.yaml.j2"


# -- lint and schema -------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_FILES, ids=ci_id)
def test_lint_strict_is_clean(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values), "--namespace", NAMESPACE)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_ci_files_cover_every_feature() -> None:
    names = {ci_id(p) for p in CI_FILES}
    assert names >= {
        "default",
        "ha",
        "existing-secret",
        "instruments",
        "volumes",
        "network-policy",
        "custom-job-template",
        "operator-role",
        "broker-tls",
        "broker-identities",
    }


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (("broker.pasword=x",), "pasword"),  # typo at a nested level
        (("replicaCuont=2",), "replicaCuont"),  # typo at the top level
        (("runner.resources.request.cpu=1",), "request"),
        (("instruments.WISH.maxRuning=2",), "maxRuning"),
        (("replicaCount=two",), "replicaCount"),  # wrong type
        (("concurrency=0",), "concurrency"),  # out of range
        (("terminationGracePeriodSeconds=10",), "terminationGracePeriodSeconds"),
        (("image.pullPolicy=Sometimes",), "pullPolicy"),  # not in the enum
        (("broker.hosts[0]=activemq",), "hosts"),  # no port
        (("jobs.labelPrefix=Not_A_Domain",), "labelPrefix"),
        (
            (
                "runner.archiveVolumes[0].name=a",
                "runner.archiveVolumes[0].mountPath=/a",
                "runner.archiveVolumes[0].source.persistentVolumeclaim.claimName=x",
            ),
            "persistentVolumeclaim",
        ),
        (("runnerConfig.timeout=5",), "timeout"),
        (("broker.tls.enable=true",), "enable"),
        (("broker.tls.caBundle=/etc/ssl/certs/ca.pem",), "caBundle"),  # a path, not the PEM
    ],
)
def test_schema_rejects_bad_values(sets: tuple[str, ...], complaint: str) -> None:
    args = ["template", RELEASE, str(CHART), "--set", "broker.password=x"]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0, f"{sets} rendered:\n{result.stdout[:500]}"
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        # A negative (or zero) cap: the message names the value and what it got.
        (("caps.maxRunning=-1",), ("'/caps/maxRunning'", "got -1")),
        (("caps.maxRunning=0",), ("'/caps/maxRunning'", "got 0")),
        (("instruments.WISH.maxRunning=-1",), ("'/instruments/WISH/maxRunning'", "got -1")),
        # An empty image repository.
        (("image.repository=",), ("'/image/repository'",)),
        (("runner.image.repository=",), ("'/runner/image/repository'",)),
        (("instruments.WISH.image.repository=",), ("'/instruments/WISH/image/repository'",)),
        # A missing one (null deletes the default): it would render ":0.1.0".
        (("image.repository=null",), ("'/image'", "'repository'")),
        (("runner.image.repository=null",), ("'/runner/image'", "'repository'")),
        (("image=null",), ("missing property 'image'",)),
        (("runner.image=null",), ("'/runner'", "'image'")),
    ],
)
def test_schema_rejects_a_negative_cap_and_a_missing_image(
    sets: tuple[str, ...], names: tuple[str, ...]
) -> None:
    args = ["template", RELEASE, str(CHART), "--set", "broker.password=x"]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0, f"{sets} rendered:\n{result.stdout[:500]}"
    for name in names:
        assert name in result.stderr, result.stderr


def test_an_image_without_repository_in_a_values_file_fails(tmp_path: Path) -> None:
    # "repository:" with nothing after it is null in YAML, the easiest way to lose it.
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("broker:\n  password: x\nrunner:\n  image:\n    repository:\n    tag: '1'\n")
    result = helm("template", RELEASE, str(CHART), "-f", str(bad), check=False)
    assert result.returncode != 0
    assert "'/runner/image'" in result.stderr and "'repository'" in result.stderr


def test_a_typo_in_a_values_file_fails_too(tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("broker:\n  password: x\nrunner:\n  activeDeadlineSecond: 60\n")
    result = helm("template", RELEASE, str(CHART), "-f", str(bad), check=False)
    assert result.returncode != 0
    assert "activeDeadlineSecond" in result.stderr


def test_no_password_and_no_existing_secret_is_refused() -> None:
    result = helm("template", RELEASE, str(CHART), check=False)
    assert result.returncode != 0
    assert "broker.password" in result.stderr and "existingSecret" in result.stderr


def test_schema_and_values_have_the_same_top_level_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(schema["properties"]) - {"global"} == set(values)


# -- settings.yaml ---------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_FILES, ids=ci_id)
def test_rendered_settings_load_as_dispatcher_settings(
    values: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(values)
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    deployment = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    assert settings.jobs.namespace == NAMESPACE
    assert settings.broker.password.get_secret_value() == "s3cret"
    # The files settings name are the files the Deployment mounts.
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTOREDUCE_CONFIG_FILE"]["value"] == f"{mounts['config']}/settings.yaml"
    if "job.yaml.j2" in dispatcher_config_map(docs)["data"]:
        assert str(settings.jobs.template_path) == f"{mounts['config']}/job.yaml.j2"
    else:
        assert settings.jobs.template_path == DEFAULT_TEMPLATE
    rendered = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    assert rendered["broker"]["password_file"] == f"{mounts['broker']}/password"
    if settings.jobs.broker_username is None:  # reductions use the dispatcher's Secret
        secret_volume = volumes["broker"]["secret"]
        assert secret_volume["secretName"] == settings.jobs.broker_secret_name
        assert secret_volume["items"] == [
            {"key": settings.jobs.broker_secret_key, "path": "password"}]
    assert settings.http_port == container["ports"][0]["containerPort"]
    # Secrets never travel in the settings file.
    assert "password:" not in dispatcher_config_map(docs)["data"]["settings.yaml"].replace(
        "password_file", ""
    )


def test_default_settings_match_the_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(CHART / "ci" / "default-values.yaml")
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert s.broker.hosts == values["broker"]["hosts"]
    assert s.broker.queues.dead_letter == values["broker"]["queues"]["deadLetter"]
    assert s.jobs.broker_secret_name == f"{RELEASE}-autoreduce-broker"
    assert (
        find(docs, "Secret", s.jobs.broker_secret_name)["data"]["password"]
        == base64.b64encode(b"change-me").decode()
    )
    assert s.jobs.runner_config_map is None
    assert s.runner.image == "autoreduce-runner:0.1.0"
    assert s.runner.resources.requests == {"cpu": "1", "memory": "2Gi"}
    assert s.runner.active_deadline_seconds == values["runner"]["activeDeadlineSeconds"]
    assert s.caps.max_running is None
    # No API cap by default: the apiserver paces us (dispatcher.kube.pacing).
    assert (s.concurrency, s.api_qps, s.api_burst) == (1, None, None)
    assert (s.retries.mode, s.retries.max_attempts, s.retries.delay_s) == ("dispatcher", 3, 300)
    assert s.image_pull_grace_s == 300
    assert s.priority_classes.model_dump() == {"run_detection": None, "manual": None, "rerun": None}
    assert s.runner.priority_class_name is None


def test_existing_secret_is_referenced_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "existing-secret-values.yaml")
    assert "Secret" not in kinds(docs)
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert (s.jobs.broker_secret_name, s.jobs.broker_secret_key) == (
        "activemq-credentials",
        "stomp-password",
    )
    assert s.broker.username == "reducer"


def test_reductions_get_a_broker_identity_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "broker-identities-values.yaml")
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    runner_secret = f"{RELEASE}-autoreduce-broker-runner"
    assert (s.jobs.broker_username, s.jobs.broker_secret_name, s.jobs.broker_secret_key) == (
        "autoreduce-runner", runner_secret, "password")
    assert s.broker.username == "autoreduce"
    secrets = {d["metadata"]["name"]: d["data"]["password"]
               for d in docs if d["kind"] == "Secret"}
    assert secrets == {f"{RELEASE}-autoreduce-broker": base64.b64encode(b"change-me").decode(),
                       runner_secret: base64.b64encode(b"change-me-too").decode()}
    # The dispatcher's pod and the canary mount the dispatcher's password only.
    for name in ("Deployment", "Pod", "Job"):
        for doc in (d for d in docs if d["kind"] == name):
            spec = doc["spec"]["template"]["spec"] if name != "Pod" else doc["spec"]
            mounted = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            assert runner_secret not in mounted, doc["metadata"]["name"]
    job = rendered_job(docs, tmp_path, monkeypatch)
    pod = job["spec"]["template"]["spec"]
    (poster,) = pod["initContainers"]  # the only container with the credential
    env = {e["name"]: e.get("value") for e in poster["env"]}
    assert env["AUTOREDUCE_BROKER__USERNAME"] == "autoreduce-runner"
    (broker_volume,) = [v for v in pod["volumes"] if v["name"] == "broker"]
    assert broker_volume["secret"] == {"secretName": runner_secret,
                                       "items": [{"key": "password", "path": "password"}]}


def test_a_runner_user_needs_a_password_or_an_existing_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "broker.password=x",
                  "--set", "broker.runner.username=runner", check=False)
    assert result.returncode != 0
    assert "broker.runner.password" in result.stderr, result.stderr
    docs = render(sets=("broker.password=x", "broker.runner.username=runner",
                        "broker.runner.existingSecret=site-runner", "broker.runner.secretKey=pw"))
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [
        f"{RELEASE}-autoreduce-broker"]
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert (s.jobs.broker_secret_name, s.jobs.broker_secret_key) == ("site-runner", "pw")


def test_instrument_overrides_and_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(CHART / "ci" / "instruments-values.yaml")
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert s.caps.max_running == 20
    assert set(s.instruments) == {"WISH", "MARI"}  # keys upper-cased
    wish = s.instruments["WISH"]
    assert wish.image == "registry.example/autoreduce-runner-mantid:6.11"
    assert wish.resources is not None and wish.resources.requests == {"cpu": "4", "memory": "16Gi"}
    assert wish.node_selector == {"autoreduce.io/pool": "large"}
    assert wish.env == {"MANTID_THREADS": "4"}
    assert (wish.max_running, wish.active_deadline_seconds) == (2, 28800)
    mari = s.instruments["MARI"]
    # Unset fields stay unset, so they inherit the defaults.
    assert mari.image is None and mari.resources is None and mari.tolerations is None
    assert (mari.max_running, mari.active_deadline_seconds) == (1, 1800)
    # priorityClass.create: reductions use the chart's PriorityClass.
    priority_class = find(docs, "PriorityClass")
    assert s.runner.priority_class_name == priority_class["metadata"]["name"]
    assert priority_class["value"] == 500
    assert (s.retries.mode, s.retries.max_attempts, s.retries.delay_s) == ("dispatcher", 2, 60)
    assert s.priority_classes.run_detection is None  # empty value: the default applies
    assert s.priority_classes.rerun == "autoreduce-low"


def test_priority_classes_per_source_when_the_chart_creates_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "default-values.yaml", sets=(
        "priorityClasses.create=true", "priorityClasses.manual=site-manual",
        "priorityClasses.values.rerun=-10"))
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    detection, rerun = f"{RELEASE}-autoreduce-run-detection", f"{RELEASE}-autoreduce-rerun"
    assert {name: (d["value"], d["preemptionPolicy"]) for name, d in classes.items()} == {
        detection: (1000, "PreemptLowerPriority"),
        f"{RELEASE}-autoreduce-manual": (500, "PreemptLowerPriority"),
        rerun: (-10, "PreemptLowerPriority")}
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    # A name given wins over the chart's own class; the others use the chart's.
    assert s.priority_classes.model_dump() == {
        "run_detection": detection, "manual": "site-manual", "rerun": rerun}
    # Below -10 the cluster autoscaler would ignore pending reruns: refused.
    refused = helm("template", RELEASE, str(CHART), "--set", "priorityClasses.create=true",
                   "--set", "priorityClasses.values.rerun=-11", check=False)
    assert refused.returncode != 0 and "minimum" in refused.stderr, refused.stderr


def test_volumes_and_runner_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(CHART / "ci" / "volumes-values.yaml")
    s = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert [(v.name, v.mount_path, v.source) for v in s.runner.archive_volumes] == [
        (
            "archive",
            "/isis",
            {"nfs": {"server": "archive.example", "path": "/isis", "readOnly": True}},
        ),
        (
            "local-cache",
            "/cache",
            {"hostPath": {"path": "/var/cache/isis", "type": "DirectoryOrCreate"}},
        ),
    ]
    assert [(v.name, v.source) for v in s.runner.output_volumes] == [
        ("ceph-output", {"persistentVolumeClaim": {"claimName": "cephfs-instrument"}}),
    ]
    let = s.instruments["LET"]
    assert let.output_volumes is not None and let.output_volumes[0].name == "let-output"
    runner_cm = find(docs, "ConfigMap", s.jobs.runner_config_map)
    runner_yaml = yaml.safe_load(runner_cm["data"]["runner.yaml"])
    assert runner_yaml["archive_roots"] == ["/isis", "/cache"]
    assert runner_yaml["path_mappings"] == [{"windows": "\\\\isis\\inst$\\", "linux": "/isis/"}]


def test_an_api_cap_set_alone_gets_its_default_burst_and_null_means_the_servers_pace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = CHART / "ci" / "default-values.yaml"
    capped = load_rendered_settings(render(base, sets=("api.qps=20",)), tmp_path, monkeypatch)
    assert (capped.api_qps, capped.api_burst) == (20, None)  # the Pacer makes it 2 x qps
    both = load_rendered_settings(render(base, sets=("api.qps=20", "api.burst=5")), tmp_path,
                                  monkeypatch)  # fmt: skip
    assert (both.api_qps, both.api_burst) == (20, 5)
    result = helm("template", RELEASE, str(CHART), "-f", str(base), "--set", "api.qps=0",
                  check=False)  # fmt: skip
    assert result.returncode != 0 and "qps" in result.stderr


def test_runner_config_is_a_valid_runner_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pytest.importorskip("autoreduce_runner.config")
    docs = render(CHART / "ci" / "volumes-values.yaml")
    runner_cm = next(d for d in docs if d["kind"] == "ConfigMap" and "runner.yaml" in d["data"])
    path = tmp_path / "runner.yaml"
    path.write_text(runner_cm["data"]["runner.yaml"])
    monkeypatch.setenv("AUTOREDUCE_RUNNER_CONFIG", str(path))
    settings = config.load_settings()
    assert [str(p) for p in settings.archive_roots] == ["/isis", "/cache"]
    assert settings.timeout_s == 3600


def test_runner_config_schema_knows_every_runner_file_setting() -> None:
    config = pytest.importorskip("autoreduce_runner.config")
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_schema = set(schema["properties"]["runnerConfig"]["properties"])
    # These come from the Job template's environment, not from the file.
    from_env = {"broker", "message_file", "runner_config", "termination_log", "outcome_id",
                "poster_socket", "poster_state_dir", "oom_retry_limit"}
    # The fault suite's fault points are never chart settings (faults.py).
    from_env |= {"fault_point", "fault_action"}
    assert in_schema == set(config.RunnerSettings.model_fields) - from_env


# -- the Job the rendered template makes -------------------------------------------------


def sample_key(instrument: str = "WISH") -> RunKey:
    return RunKey(
        facility="ISIS", instrument=instrument, runs=(44123,), version=0, rb_number="1920001"
    )


def rendered_job(
    docs: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    instrument: str = "WISH",
    priority: int = 9,
) -> dict[str, Any]:
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    return render_job(
        settings=settings,
        template=load_template(job_template_file(docs, settings, tmp_path)),
        key=sample_key(instrument),
        arrival=Arrival(priority=priority, enqueued_ms=1, message_id="ID:1"),
    )


@pytest.mark.parametrize("values", CI_FILES, ids=ci_id)
def test_rendered_job_template_makes_a_suspended_job(
    values: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(values)
    job = rendered_job(docs, tmp_path, monkeypatch)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["autoreduce.io/managed"] == "true"
    pod = job["spec"]["template"]["spec"]
    broker_volume = next(v for v in pod["volumes"] if v["name"] == "broker")
    settings = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    assert broker_volume["secret"]["secretName"] == settings["jobs"]["broker_secret_name"]


def test_job_for_an_overridden_instrument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(CHART / "ci" / "instruments-values.yaml")
    job = rendered_job(docs, tmp_path, monkeypatch, instrument="WISH")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/autoreduce-runner-mantid:6.11"
    assert pod["nodeSelector"] == {"autoreduce.io/pool": "large"}
    assert pod["priorityClassName"] == find(docs, "PriorityClass")["metadata"]["name"]
    assert pod["activeDeadlineSeconds"] == 28800  # the pod's limit, not the Job's


def test_reruns_get_their_own_priority_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "instruments-values.yaml")
    job = rendered_job(docs, tmp_path, monkeypatch, instrument="MARI", priority=0)
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "autoreduce-low"


def test_job_mounts_volumes_and_runner_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(CHART / "ci" / "volumes-values.yaml")
    job = rendered_job(docs, tmp_path, monkeypatch, instrument="LET")
    pod = job["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["archive"]["readOnly"] is True and mounts["archive"]["mountPath"] == "/isis"
    assert mounts["let-output"]["readOnly"] is False
    assert "ceph-output" not in mounts  # LET's own output volume replaces the default
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["archive"]["nfs"]["server"] == "archive.example"
    runner_cm = next(d for d in docs if d["kind"] == "ConfigMap" and "runner.yaml" in d["data"])
    assert volumes["runner-config"]["configMap"]["name"] == runner_cm["metadata"]["name"]


def test_custom_job_template_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(CHART / "ci" / "custom-job-template-values.yaml")
    job = rendered_job(docs, tmp_path, monkeypatch)
    assert job["metadata"]["labels"]["site.example/team"] == "reduction"
    assert any(v["name"] == "scratch" for v in job["spec"]["template"]["spec"]["volumes"])


# -- the Deployment ----------------------------------------------------------------------


def test_deployment_runs_the_dispatcher_locked_down() -> None:
    docs = render(CHART / "ci" / "default-values.yaml")
    deployment = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "autoreduce-dispatcher:0.1.0"
    assert container["command"] == ["python", "-m", "dispatcher"]
    assert pod["terminationGracePeriodSeconds"] >= 45
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AUTOREDUCE_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount")["metadata"]["name"]
    assert "KUBECONFIG" not in env  # in-cluster credentials
    assert {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PriorityClass"}.isdisjoint(
        kinds(docs)
    )


def test_changed_values_roll_the_pods_and_unchanged_do_not() -> None:
    def checksum(*sets: str) -> str:
        docs = render(CHART / "ci" / "default-values.yaml", sets=sets)
        return find(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    base = checksum()
    assert checksum() == base
    assert checksum("concurrency=8") != base
    assert checksum("jobTemplate=x") != base
    assert checksum("replicaCount=3") == base


def test_recreate_strategy_drops_the_default_rolling_update() -> None:
    docs = render(CHART / "ci" / "default-values.yaml", sets=("strategy.type=Recreate",))
    assert find(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    docs = render(CHART / "ci" / "default-values.yaml")
    assert find(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 1,
        "maxUnavailable": 0,
    }


def test_ha_has_a_pod_disruption_budget() -> None:
    docs = render(CHART / "ci" / "ha-values.yaml")
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == find(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert find(docs, "Deployment")["spec"]["replicas"] == 2


def test_service_and_service_monitor_reach_the_dispatchers_metrics_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(
        CHART / "ci" / "default-values.yaml",
        sets=(
            "httpPort=9102",
            "service.port=80",
            "podLabels.team=reduction",
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.interval=15s",
            "metrics.serviceMonitor.labels.release=prometheus",
        ),
    )
    deployment = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p for p in container["ports"]}
    # The Service selects exactly the dispatcher pods of this release...
    service = find(docs, "Service")
    selector = service["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert selector["app.kubernetes.io/instance"] == RELEASE
    # ...on the port the dispatcher serves /metrics on.
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    target = container_ports[port["targetPort"]]
    assert target["containerPort"] == 9102 and target["protocol"] == port["protocol"]
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert settings.http_port == target["containerPort"]
    # The ServiceMonitor selects that Service (not the pods) in the release namespace,
    # scrapes its named port, and carries the labels Prometheus selects monitors by.
    monitor = find(docs, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {
        "matchNames": [service["metadata"]["namespace"]]
    }
    assert service["metadata"]["namespace"] == NAMESPACE
    assert monitor["spec"]["endpoints"] == [
        {"port": port["name"], "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_every_object_has_standard_labels_and_fitting_names() -> None:
    long_release = "a-long-release-name-for-autoreduction-at-facility-xyz"  # 53: Helm's max
    assert len(long_release) == 53
    docs = render(
        CHART / "ci" / "default-values.yaml",
        CHART / "ci" / "network-policy-values.yaml",
        CHART / "ci" / "volumes-values.yaml",
        CHART / "ci" / "broker-tls-values.yaml",
        sets=("priorityClass.create=true",),
        release=long_release,
    )
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-"), name
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == long_release
        assert labels["app.kubernetes.io/name"] == "autoreduce"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "autoreduce-0.1.0"
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)


# -- RBAC --------------------------------------------------------------------------------


DISPATCHER_ROLE = f"{RELEASE}-autoreduce"
OPERATOR_ROLE = f"{RELEASE}-autoreduce-operator"


def granted(role: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """(group, resource) -> sorted verbs, over every rule of a Role."""
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "resourceNames" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: sorted(value) for key, value in verbs.items()}


def test_role_grants_exactly_what_the_dispatcher_calls() -> None:
    docs = render(CHART / "ci" / "default-values.yaml")
    assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)
    role = find(docs, "Role", DISPATCHER_ROLE)
    assert granted(role) == {
        ("batch", "jobs"): sorted(["create", "get", "list", "watch", "patch", "delete"]),
        ("batch", "jobs/finalizers"): ["update"],
        ("", "configmaps"): sorted(["create", "get"]),
        # No list: the dispatcher reads each Lease by name; `autoreduce status` lists
        # them with the operator Role.
        ("coordination.k8s.io", "leases"): sorted(["create", "get", "update", "delete"]),
        ("", "pods"): ["list", "patch", "watch"],
        ("", "pods/log"): ["get"],
        ("events.k8s.io", "events"): ["create"],
    }
    binding = find(docs, "RoleBinding", DISPATCHER_ROLE)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": find(docs, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]


# The Kube methods the operator CLI may call, and the right each one needs.
CLI_KUBE_RIGHTS = {
    "get_job": ("batch", "jobs", "get"),  # following a run
    "list_jobs": ("batch", "jobs", "list"),  # status; retry's next version
    "list_pods": ("", "pods", "list"),  # status; a followed run told from its pods
    "get_config_map": ("", "configmaps", "get"),  # retry: the Job's message
    "get_lease": ("coordination.k8s.io", "leases", "get"),  # a followed run that waits
    "list_leases": ("coordination.k8s.io", "leases", "list"),  # status: the RB holders
    "dry_run_job": ("batch", "jobs", "create"),  # render --dry-run-server (serverDryRun)
    "list_events": ("events.k8s.io", "events", "list"),  # explain: a run's Events
}
OPERATOR_GRANTS = {
    ("batch", "jobs"): ["get", "list"],
    ("", "pods"): ["list"],
    ("", "configmaps"): ["get"],
    ("coordination.k8s.io", "leases"): ["get", "list"],
    ("events.k8s.io", "events"): ["list"],
}


def kube_methods_called(path: Path) -> set[str]:
    """The dispatcher.kube.Kube methods a module calls (by attribute name)."""
    # connect builds the client and makes no request.
    methods = {name for name in vars(Kube) if not name.startswith("_")} - {"connect"}
    tree = ast.parse(path.read_text())
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in methods
    }


def test_operator_grants_follow_from_the_cli_code() -> None:
    called = kube_methods_called(REPO / "autoreduce_cli" / "cli.py")
    assert called <= set(CLI_KUBE_RIGHTS), f"add the rights of {called - set(CLI_KUBE_RIGHTS)}"
    needed: dict[tuple[str, str], set[str]] = {}
    for method in called - {"dry_run_job"}:
        group, resource, verb = CLI_KUBE_RIGHTS[method]
        needed.setdefault((group, resource), set()).add(verb)
    assert {key: sorted(verbs) for key, verbs in needed.items()} == OPERATOR_GRANTS
    assert "dry_run_job" in called  # the one call behind operatorRole.serverDryRun


def test_operator_role_grants_exactly_what_the_cli_calls_and_is_bound_to_nobody() -> None:
    docs = render(CHART / "ci" / "default-values.yaml")
    role = find(docs, "Role", OPERATOR_ROLE)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert granted(role) == OPERATOR_GRANTS
    # No subjects: no RoleBinding, so the Role grants nothing until an operator binds it.
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert [b["roleRef"]["name"] for b in bindings] == [DISPATCHER_ROLE]


def test_operator_role_binds_the_subjects_given() -> None:
    docs = render(CHART / "ci" / "operator-role-values.yaml")
    binding = find(docs, "RoleBinding", OPERATOR_ROLE)
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": OPERATOR_ROLE,
    }
    group = "rbac.authorization.k8s.io"
    assert binding["subjects"] == [
        {"kind": "Group", "name": "reduction-operators", "apiGroup": group},
        {"kind": "User", "name": "alice@example.org", "apiGroup": group},
        {"kind": "ServiceAccount", "name": "ar-autoreduce", "namespace": NAMESPACE},
        {"kind": "ServiceAccount", "name": "ci", "namespace": "tools"},
    ]
    # serverDryRun adds create on Jobs, and nothing else.
    assert granted(find(docs, "Role", OPERATOR_ROLE)) == {
        **OPERATOR_GRANTS,
        ("batch", "jobs"): ["create", "get", "list"],
    }
    # Binding it (even to the dispatcher's account) leaves the dispatcher's own Role as it is.
    dispatcher_role = granted(find(docs, "Role", DISPATCHER_ROLE))
    assert dispatcher_role[("coordination.k8s.io", "leases")] == [
        "create", "delete", "get", "update"
    ]  # fmt: skip


def test_operator_role_can_be_left_out() -> None:
    docs = render(CHART / "ci" / "default-values.yaml", sets=("operatorRole.create=false",))
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Role"] == [DISPATCHER_ROLE]


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        # Subjects with no Role to bind them to.
        (
            (
                "operatorRole.create=false",
                "operatorRole.subjects[0].kind=Group",
                "operatorRole.subjects[0].name=g",
            ),
            "operatorRole.create is false",
        ),
        (
            ("operatorRole.subjects[0].kind=Grup", "operatorRole.subjects[0].name=g"),
            "'/operatorRole/subjects/0/kind'",
        ),
        (("operatorRole.subjects[0].kind=Group",), "'name'"),
        # A namespace means something for a ServiceAccount only.
        (
            (
                "operatorRole.subjects[0].kind=User",
                "operatorRole.subjects[0].name=u",
                "operatorRole.subjects[0].namespace=x",
            ),
            "'/operatorRole/subjects/0'",
        ),
        (("operatorRole.subject[0].kind=Group",), "subject"),
    ],
    ids=["subjects-without-role", "bad-kind", "no-name", "namespace-on-a-user", "typo"],
)
def test_operator_role_values_are_checked(sets: tuple[str, ...], complaint: str) -> None:
    args = ["template", RELEASE, str(CHART), "--set", "broker.password=x"]
    for item in sets:
        args += ["--set", item]
    result = helm(*args, check=False)
    assert result.returncode != 0, f"{sets} rendered:\n{result.stdout[:500]}"
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize("template", ["rbac.yaml", "operator-rbac.yaml"])
def test_every_rbac_rule_carries_a_comment(template: str) -> None:
    text = (CHART / "templates" / template).read_text().splitlines()
    rule_lines = [i for i, line in enumerate(text) if line.strip().startswith("- apiGroups:")]
    assert rule_lines
    for index in rule_lines:
        assert text[index - 1].strip().startswith("#"), f"rule at line {index + 1} has no comment"
    if template == "rbac.yaml":
        assert "resourceNames" in "\n".join(text)  # says why Leases cannot use it


def test_readme_cleanup_commands_select_what_the_dispatcher_labels() -> None:
    """The commands that remove what `helm uninstall` keeps use the labels the
    dispatcher really puts on its Jobs, cancel markers and Leases."""
    readme = (CHART / "README.md").read_text()
    labels = Labels("autoreduce.io")
    key = sample_key()
    job_labels = labels.for_run(key)
    lease = lease_body(labels=labels, rb=key.rb_number, holder="j", identity="d", base=None)
    managed = f"{labels.managed}={job_labels[labels.managed]}"
    assert lease["metadata"]["labels"][labels.managed] == "true"
    assert f"kubectl delete jobs -n <ns> -l {managed}\n" in readme
    assert f"kubectl delete leases -n <ns> -l {managed}\n" in readme
    assert f"kubectl delete configmaps -n <ns> -l {managed}\n" in readme
    # Cancel markers drop the managed label (never a run) and carry the cancel one.
    assert f"kubectl delete jobs -n <ns> -l {labels.key('cancel')}=true\n" in readme
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for selector in ("managed=true", "cancel=true"):
        assert f"-l {{{{ .Values.jobs.labelPrefix }}}}/{selector}" in notes


# -- network policy ----------------------------------------------------------------------


def test_network_policies_limit_dispatcher_and_runner_egress() -> None:
    docs = render(CHART / "ci" / "network-policy-values.yaml")
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    dispatcher = policies[f"{RELEASE}-autoreduce"]
    runner = policies[f"{RELEASE}-autoreduce-runner"]
    assert runner["spec"]["podSelector"] == {"matchLabels": {"autoreduce.io/managed": "true"}}
    assert runner["spec"]["ingress"] == []
    broker_rule = runner["spec"]["egress"][0]
    assert broker_rule["ports"] == [{"port": 61613, "protocol": "TCP"}]
    assert broker_rule["to"][0]["podSelector"] == {"matchLabels": {"app": "activemq"}}
    dispatcher_ports = [
        sorted(p["port"] for p in rule["ports"]) for rule in dispatcher["spec"]["egress"]
    ]
    assert dispatcher_ports == [[61613], [443, 6443], [53, 53]]
    assert set(dispatcher["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_broker_ports_come_from_the_hosts() -> None:
    docs = render(
        CHART / "ci" / "network-policy-values.yaml",
        sets=("broker.hosts={a:61613,b:61614,c:61613}",),
    )
    runner = find(docs, "NetworkPolicy", f"{RELEASE}-autoreduce-runner")
    assert [p["port"] for p in runner["spec"]["egress"][0]["ports"]] == [61613, 61614]


# -- TLS to the broker -------------------------------------------------------------------


TLS_VALUES = CHART / "ci" / "broker-tls-values.yaml"
BROKER_CA = f"{RELEASE}-autoreduce-broker-ca"


def mounted_files(pod: dict[str, Any], container: dict[str, Any] | None = None
                  ) -> dict[str, tuple[str, str, str]]:
    """Each file a container (the pod's first by default) sees from a ConfigMap or
    Secret item: path -> (volume kind, object name, key)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in (container or pod["containers"][0])["volumeMounts"]:
        volume = volumes[mount["name"]]
        for kind, name_key in (("configMap", "name"), ("secret", "secretName")):
            if kind in volume:
                source = volume[kind]
                for item in source.get("items", []):
                    path = f"{mount['mountPath']}/{item['path']}"
                    files[path] = (kind, source[name_key], item["key"])
    return files


def client_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pods that connect to the broker with the dispatcher's settings."""
    return {
        "dispatcher": find(docs, "Deployment")["spec"]["template"]["spec"],
        "canary": find(docs, "Job", f"{RELEASE}-autoreduce-canary")["spec"]["template"]["spec"],
    }


def test_broker_tls_gives_the_dispatcher_and_canary_the_files_their_settings_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(TLS_VALUES)
    tls_values = yaml.safe_load(TLS_VALUES.read_text())["broker"]["tls"]
    ca = find(docs, "ConfigMap", BROKER_CA)
    assert ca["data"] == {"ca.crt": tls_values["caBundle"]}
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    tls = settings.broker.tls
    # The runner pods' paths (pod_contract) for the dispatcher's own files too.
    assert tls == TlsSettings(
        enabled=True,
        ca_file=Path(pod_contract.BROKER_CA_FILE),
        cert_file=Path(pod_contract.BROKER_CLIENT_CERT_FILE),
        key_file=Path(pod_contract.BROKER_CLIENT_KEY_FILE),
    )
    client_cert = tls_values["clientCertSecret"]
    for name, pod in client_pods(docs).items():
        files = mounted_files(pod)
        assert files[str(tls.ca_file)] == ("configMap", BROKER_CA, "ca.crt"), name
        assert files[str(tls.cert_file)] == ("secret", client_cert, "tls.crt"), name
        assert files[str(tls.key_file)] == ("secret", client_cert, "tls.key"), name
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["broker-ca"]["readOnly"] and mounts["broker-client-cert"]["readOnly"]


def test_broker_tls_reaches_the_reduction_pods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render(TLS_VALUES)
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    runner_cert = yaml.safe_load(TLS_VALUES.read_text())["broker"]["tls"]["runnerClientCertSecret"]
    jobs = settings.jobs
    assert (jobs.broker_ca_config_map, jobs.broker_ca_key) == (BROKER_CA, "ca.crt")
    assert jobs.broker_client_cert_secret == runner_cert
    pod = rendered_job(docs, tmp_path, monkeypatch)["spec"]["template"]["spec"]
    (poster,) = pod["initContainers"]  # the poster sidecar holds the broker's files
    files = mounted_files(pod, poster)
    assert files[pod_contract.BROKER_CA_FILE] == ("configMap", BROKER_CA, "ca.crt")
    assert files[pod_contract.BROKER_CLIENT_CERT_FILE] == ("secret", runner_cert, "tls.crt")
    assert files[pod_contract.BROKER_CLIENT_KEY_FILE] == ("secret", runner_cert, "tls.key")
    # ... and the runner, where reduce.py runs, none of them.
    runner_mounts = {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert not runner_mounts & {"broker", "broker-ca", "broker-client-cert"}, runner_mounts


@pytest.mark.parametrize(
    ("sets", "config_map", "key"),
    [
        (
            ("broker.tls.existingCaConfigMap=site-ca", "broker.tls.caKey=bundle.pem"),
            "site-ca",
            "bundle.pem",
        ),
        ((), None, "ca.crt"),
    ],
    ids=["existing-config-map", "system-trust-store"],
)
def test_broker_tls_ca_from_the_sites_config_map_or_the_images_trust_store(
    sets: tuple[str, ...],
    config_map: str | None,
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = render(CHART / "ci" / "default-values.yaml", sets=("broker.tls.enabled=true", *sets))
    assert not [d for d in docs if d["metadata"]["name"] == BROKER_CA]
    settings = load_rendered_settings(docs, tmp_path, monkeypatch)
    assert (settings.jobs.broker_ca_config_map, settings.jobs.broker_ca_key) == (config_map, key)
    # No client certificate asked for: none mounted, none named.
    assert settings.broker.tls.cert_file is None and settings.broker.tls.key_file is None
    assert settings.jobs.broker_client_cert_secret is None
    for name, pod in client_pods(docs).items():
        files = mounted_files(pod)
        assert not [f for f in files if f.startswith(pod_contract.BROKER_CLIENT_CERT_DIR)], name
        if config_map is None:
            assert settings.broker.tls.ca_file is None
            assert not [f for f in files if f.startswith(pod_contract.BROKER_CA_DIR)], name
        else:
            assert settings.broker.tls.ca_file == Path(pod_contract.BROKER_CA_FILE)
            assert files[pod_contract.BROKER_CA_FILE] == ("configMap", config_map, key), name


@pytest.mark.parametrize(
    "tls",
    [
        yaml.safe_load(TLS_VALUES.read_text())["broker"]["tls"],
        {"existingCaConfigMap": "site-ca", "caKey": "bundle.pem", "clientCertSecret": "c"},
    ],
    ids=["ca-bundle", "existing-config-map"],
)
def test_broker_tls_off_renders_nothing_of_it(tls: dict[str, Any], tmp_path: Path) -> None:
    """TLS values with enabled false change no object at all."""
    tls_off = tmp_path / "tls-off-values.yaml"
    tls_off.write_text(yaml.safe_dump({"broker": {"tls": {**tls, "enabled": False}}}))
    default = CHART / "ci" / "default-values.yaml"
    docs = render(default)
    assert render(default, tls_off) == docs
    rendered = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    assert rendered["broker"]["tls"] == TlsSettings().model_dump(mode="json")
    assert rendered["jobs"]["broker_ca_config_map"] is None
    assert rendered["jobs"]["broker_client_cert_secret"] is None
    for name, pod in client_pods(docs).items():
        volumes = {v["name"] for v in pod["volumes"]}
        assert volumes.isdisjoint({"broker-ca", "broker-client-cert"}), name


def test_a_ca_bundle_and_an_existing_ca_config_map_together_are_refused() -> None:
    result = helm(
        "template", RELEASE, str(CHART), "-f", str(TLS_VALUES),
        "--set", "broker.tls.existingCaConfigMap=site-ca",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "caBundle" in result.stderr and "existingCaConfigMap" in result.stderr
    assert "not both" in result.stderr


# -- documentation -----------------------------------------------------------------------


def _leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        paths = []
        for key, value in values.items():
            paths += _leaf_paths(value, f"{prefix}{key}.")
        return paths
    return [prefix.rstrip(".")]


OPAQUE = (
    "strategy",
    "podSecurityContext",
    "securityContext",
    "resources",
    "runner.resources",
    "runner.command",
)


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert f"`{key}" in readme, f"top-level value {key} missing from README.md"
    missing = []
    for path in _leaf_paths(values):
        documented = next((p for p in OPAQUE if path == p or path.startswith(p + ".")), path)
        if f"`{documented}`" not in readme:
            missing.append(documented)
    assert not missing, f"values missing from helm/autoreduce/README.md: {sorted(set(missing))}"


def test_every_value_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    leaves = set(_leaf_paths(values))
    stack: list[tuple[int, str]] = []
    undocumented = []
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        key = stripped.split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if any(path.startswith(p + ".") for p in OPAQUE):
            continue
        documented = lines[index - 1].lstrip().startswith("#")
        if (path in leaves or path in OPAQUE) and not documented:
            undocumented.append(path)
    assert not undocumented, f"values without a comment: {undocumented}"

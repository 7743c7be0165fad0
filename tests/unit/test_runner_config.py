"""The runner's settings: env (prefix AUTOREDUCE_, '__' nesting) over the config file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from autoreduce_common import pod_contract
from autoreduce_common.pod_contract import PodEnv
from autoreduce_runner.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AUTOREDUCE_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_legacy_ones() -> None:
    settings = load_settings()
    assert settings.timeout_s == 3600
    assert settings.permission_retry_s == 21600
    assert settings.message_file == Path("/etc/autoreduce/message/message.json")
    assert settings.termination_log == Path("/dev/termination-log")
    assert settings.path_mappings[0].windows == "\\\\isis\\inst$\\"
    assert settings.path_mappings[0].linux == "/isis/"


def test_environment_overrides_the_file_deeply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "runner.yaml"
    config.write_text(
        "timeout_s: 10\n"
        "archive_roots: [/data/archive]\n"
        "broker:\n  username: from-file\n  queues: {started: /queue/S}\n"
        "directories:\n  output: '/o/{instrument}/{run_number}'\n"
    )
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    monkeypatch.setenv("AUTOREDUCE_RUNNER_CONFIG", str(config))
    monkeypatch.setenv("AUTOREDUCE_BROKER__HOSTS", "amq-a:61613,amq-b:61613")
    monkeypatch.setenv("AUTOREDUCE_BROKER__PASSWORD_FILE", str(password))
    monkeypatch.setenv("AUTOREDUCE_BROKER__QUEUES__ERROR", "/queue/E")
    monkeypatch.setenv("AUTOREDUCE_TIMEOUT_S", "20")
    monkeypatch.setenv("AUTOREDUCE_OUTPUT_ROOTS", "/o,/p")
    settings = load_settings()
    assert settings.timeout_s == 20
    assert settings.archive_roots == [Path("/data/archive")]
    assert settings.output_roots == [Path("/o"), Path("/p")]
    assert settings.broker.hosts == ["amq-a:61613", "amq-b:61613"]
    assert settings.broker.username == "from-file"
    assert settings.broker.password.get_secret_value() == "s3cret"
    assert settings.broker.queues.started == "/queue/S"
    assert settings.broker.queues.error == "/queue/E"
    assert settings.directories.output == "/o/{instrument}/{run_number}"


def test_json_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "runner.json"
    config.write_text(json.dumps({"log_caps": {"reduction_log": 1000}}))
    monkeypatch.setenv("AUTOREDUCE_RUNNER_CONFIG", str(config))
    assert load_settings().log_caps.reduction_log == 1000


@pytest.mark.parametrize(
    "content",
    [
        "directories: {output: '/o/{unknown}'}\n",
        "directories: {output: 'relative/{instrument}'}\n",
        "directories: {version_folder: 'a/b'}\n",
        "archive_roots: [relative]\n",
        "timeout_s: -1\n",
        "no_such_setting: 1\n",
        "- a list\n",
        "path_mappings: [{windows: 'x', linux: 'relative'}]\n",
    ],
)
def test_bad_config_is_a_config_error(
    content: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "runner.yaml"
    config.write_text(content)
    monkeypatch.setenv("AUTOREDUCE_RUNNER_CONFIG", str(config))
    with pytest.raises(ConfigError):
        load_settings()


def test_missing_config_file_and_password_file_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOREDUCE_RUNNER_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        load_settings()
    monkeypatch.delenv("AUTOREDUCE_RUNNER_CONFIG")
    monkeypatch.setenv("AUTOREDUCE_BROKER__PASSWORD_FILE", str(tmp_path / "nopw"))
    with pytest.raises(ConfigError):
        load_settings()


def test_the_jobs_env_names_are_the_runners_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every name in the pod contract sets the runner setting it is meant to set."""
    config, password = tmp_path / "runner.yaml", tmp_path / "password"
    config.write_text("{}\n")
    password.write_text("s3cret\n")
    values = {
        PodEnv.MESSAGE_FILE: "/m/message.json",
        PodEnv.TERMINATION_LOG: "/t/log",
        PodEnv.RUNNER_CONFIG: str(config),
        PodEnv.OUTCOME_ID: "red-wish-1-v0-abc",
        PodEnv.BROKER_HOSTS: "amq:61613",
        PodEnv.BROKER_USERNAME: "u",
        PodEnv.BROKER_PASSWORD_FILE: str(password),
        PodEnv.BROKER_OUTCOME_RECEIPT_TIMEOUT_S: "7",
        PodEnv.BROKER_QUEUE_PREFIX: None,  # a prefix: set below for one queue
        PodEnv.BROKER_TLS_ENABLED: "true",
        PodEnv.BROKER_TLS_CA_FILE: "/tls/ca.crt",
        PodEnv.BROKER_TLS_CERT_FILE: "/tls/tls.crt",
        PodEnv.BROKER_TLS_KEY_FILE: "/tls/tls.key",
        PodEnv.POSTER_SOCKET: "/p/poster.sock",
        PodEnv.POSTER_STATE_DIR: "/p/state",
        PodEnv.OOM_RETRY_LIMIT: "4Gi",
    }
    assert set(values) == set(PodEnv)
    for name, value in values.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv(PodEnv.BROKER_QUEUE_PREFIX + "ERROR", "/queue/E")
    settings = load_settings()
    assert settings.message_file == Path("/m/message.json")
    assert settings.termination_log == Path("/t/log")
    assert settings.runner_config == config
    assert settings.outcome_id == "red-wish-1-v0-abc"
    assert settings.broker.hosts == ["amq:61613"] and settings.broker.username == "u"
    assert settings.broker.password.get_secret_value() == "s3cret"
    assert settings.broker.outcome_receipt_timeout_s == 7
    assert settings.broker.queues.error == "/queue/E"
    tls = settings.broker.tls
    assert tls.enabled and tls.ca_file == Path("/tls/ca.crt")
    assert (tls.cert_file, tls.key_file) == (Path("/tls/tls.crt"), Path("/tls/tls.key"))
    assert settings.poster_socket == Path("/p/poster.sock")
    assert settings.poster_state_dir == Path("/p/state")
    assert settings.oom_retry_limit == "4Gi"


def test_the_runner_defaults_to_the_pods_paths() -> None:
    settings = load_settings()
    assert settings.message_file == Path(pod_contract.MESSAGE_FILE)
    assert settings.termination_log == Path(pod_contract.TERMINATION_LOG)
    assert settings.directories.temp_root.is_relative_to(pod_contract.SCRATCH_DIR)

"""The runner's settings: one typed tree, built once in ``main()`` and passed down.

Sources, later wins: defaults < the runner config file (YAML or JSON, path in
``AUTOREDUCE_RUNNER_CONFIG``) < environment (``AUTOREDUCE_`` prefix, ``__`` between
levels, e.g. ``AUTOREDUCE_BROKER__HOSTS=amq-a:61613,amq-b:61613``). Nothing here
runs at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.pod_contract import (
    MESSAGE_FILE,
    POSTER_STATE_DIR,
    SCRATCH_DIR,
    TERMINATION_LOG,
)
from autoreduce_common.settings_sources import EnvFirstSettings
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    SettingsConfigDict,
)

from autoreduce_runner.faults import FaultAction, FaultPoint, Faults
from autoreduce_runner.paths import PathMapping, check_template


class ConfigError(ValueError):
    """The runner's own configuration is unusable (exit code 2)."""


class Directories(BaseModel):
    """Where a run's files go. Templates are ``str.format`` strings over
    ``{facility}``, ``{instrument}``, ``{cycle}`` (``NN_N`` from ``cycle_NN_N`` in the
    data path), ``{rb_number}``, ``{run_number}`` (a batch's lowest run) and
    ``{run_version}``. Defaults are the legacy ISIS layout."""

    # Final output of a run (legacy CEPH_DIRECTORY).
    output: str = "/instrument/{instrument}/RBNumber/RB{rb_number}/autoreduced/{run_number}"
    # Final output when the message says ``flat_output``: no per-run folder.
    flat_output: str = "/instrument/{instrument}/RBNumber/RB{rb_number}/autoreduced"
    # Appended to the output folder unless the message says ``overwrite``.
    version_folder: str = "run-version-{run_version}"
    # The script's log file (a live tee of its stdout/stderr) goes here.
    log: str = "/instrument/{instrument}/RBNumber/RB{rb_number}/autoreduced/reduction_log"
    log_file: str = "RB{rb_number}_Run{run_number}_v{run_version}_Script.out"
    # Scratch space: the script's temporary output dir and the script itself. In a
    # pod this is in the scratch emptyDir (the root filesystem is read-only).
    temp_root: Path = Path(SCRATCH_DIR) / "autoreduce"

    @field_validator("output", "flat_output", "version_folder", "log", "log_file")
    @classmethod
    def _template(cls, value: str) -> str:
        check_template(value)
        return value

    @field_validator("version_folder", "log_file")
    @classmethod
    def _one_component(cls, value: str) -> str:
        if "/" in value or value in {"", ".", ".."}:
            raise ValueError(f"must be a single path component, got {value!r}")
        return value


class LogCaps(BaseModel):
    """Bounds on the log fields of outcome messages, in characters. Consumers store
    them in database text columns (MySQL TEXT holds 65,535 bytes)."""

    reduction_log: int = Field(default=50_000, ge=200)
    admin_log: int = Field(default=10_000, ge=200)


def _default_mappings() -> list[PathMapping]:
    return [PathMapping(windows="\\\\isis\\inst$\\", linux="/isis/")]


class RunnerSettings(EnvFirstSettings):
    """Everything the runner needs; documented in runner-image/README.md."""

    # The Job sets some of these by name (pod_contract.PodEnv): a unit test keeps the
    # names and this prefix and nesting equal.
    model_config = SettingsConfigDict(
        env_prefix="AUTOREDUCE_", env_nested_delimiter="__", extra="forbid"
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    # The run's message (mounted from the run's ConfigMap: no argv size limit).
    message_file: Path = Path(MESSAGE_FILE)
    # The file these settings may also come from (read by ``load_settings``).
    runner_config: Path | None = None
    # Kubernetes reads this file into the pod status when the container ends.
    termination_log: Path = Path(TERMINATION_LOG)
    directories: Directories = Field(default_factory=Directories)
    # Windows (UNC) prefixes of legacy data paths and where they are mounted.
    path_mappings: list[PathMapping] = Field(default_factory=_default_mappings)
    # Data files must resolve (symlinks and '..' followed) inside one of these.
    archive_roots: list[Path] = Field(default_factory=lambda: [Path("/isis")])
    # Output (the templates' and any dir main() returns) must resolve inside these.
    output_roots: list[Path] = Field(default_factory=lambda: [Path("/instrument")])
    # Seconds the script may run (legacy default 3600); then its processes are killed.
    timeout_s: float = Field(default=3600.0, gt=0)
    # Seconds between SIGTERM and SIGKILL to the script's process group.
    kill_grace_s: float = Field(default=5.0, ge=0)
    # retry_in (seconds) on a permission problem; legacy used 6 hours.
    permission_retry_s: int = Field(default=21_600, ge=1)
    # How long to keep trying to reach the broker before giving up (exit code 4). Longer
    # than the kubelet takes to refresh a rotated password's mounted file (its sync
    # period, 1 min, plus its cache): each attempt reads the file again, so a password
    # changed on the broker and in the Secret a minute apart costs a wait, not the post.
    broker_connect_timeout_s: float = Field(default=180.0, gt=0)
    log_caps: LogCaps = Field(default_factory=LogCaps)
    # The container's cgroup mount, read to tell an OOM kill of the script from another
    # SIGKILL (autoreduce_runner/oom.py); a path without cgroup files means "cannot tell".
    cgroup_root: Path = Path("/sys/fs/cgroup")
    log_level: str = "INFO"
    # This run's outcome identity (the Job's name), sent as a header on every outcome.
    outcome_id: str = ""
    # The memory limit the dispatcher retries this run with if it runs out of memory
    # (its oom_retry setting); empty: it would not be retried for that.
    oom_retry_limit: str = ""
    # The pod's poster sidecar (autoreduce_runner/sidecar.py), when it has one: the
    # runner posts through this Unix socket and holds no broker credential itself.
    poster_socket: Path | None = None
    # The sidecar's own emptyDir (mounted in the sidecar only): its "session given"
    # marker survives a restart of the sidecar there.
    poster_state_dir: Path = Path(POSTER_STATE_DIR)
    # The fault suite's named fault points (autoreduce_runner/faults.py); never set in
    # production: unset means the runner has none.
    fault_point: FaultPoint | None = None
    fault_action: FaultAction = FaultAction.EXIT

    @property
    def faults(self) -> Faults:
        return Faults(point=self.fault_point, action=self.fault_action)

    @field_validator("archive_roots", "output_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("archive_roots", "output_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("at least one root is required")
        for root in value:
            if not root.is_absolute():
                raise ValueError(f"roots must be absolute paths, got {str(root)!r}")
        return value

    @model_validator(mode="after")
    def _absolute_templates(self) -> RunnerSettings:
        for name in ("output", "flat_output", "log"):
            if not getattr(self.directories, name).startswith("/"):
                raise ValueError(f"directories.{name} must be an absolute path template")
        return self



class _Bootstrap(BaseSettings):
    """Only where the config file is: read first, to know what to load."""

    model_config = SettingsConfigDict(env_prefix="AUTOREDUCE_", extra="ignore")

    runner_config: Path | None = None


def read_config_file(path: Path) -> dict[str, Any]:
    """The runner config file as a mapping (YAML; JSON is YAML too)."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read runner config {path}: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"runner config {path} must hold a mapping")
    return loaded


def load_settings() -> RunnerSettings:
    """Build the settings from the config file (if any) and the environment."""
    try:
        config_path = _Bootstrap().runner_config
        file_values = read_config_file(config_path) if config_path else {}
        return RunnerSettings(**file_values)
    except ConfigError:
        raise
    except (ValueError, OSError) as error:  # pydantic's errors are ValueErrors
        raise ConfigError(f"invalid runner settings: {error}") from error

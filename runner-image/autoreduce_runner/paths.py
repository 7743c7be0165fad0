"""Pure path logic: UNC mapping, cycle parsing, directory templates, containment.

No function here touches the filesystem; resolving symlinks is the caller's job
(``outputs.resolve``), and these functions check the resolved result.
"""

from __future__ import annotations

import posixpath
import re
import string
from dataclasses import dataclass
from pathlib import PurePosixPath

from pydantic import BaseModel, field_validator

TEMPLATE_FIELDS = frozenset(
    {"facility", "instrument", "cycle", "rb_number", "run_number", "run_version"}
)
_CYCLE_RE = re.compile(r"cycle_(\d{2}_\d+)", re.IGNORECASE)


class PathError(ValueError):
    """A path that must not be used; the text says why (it goes into ``message``)."""


class PathMapping(BaseModel):
    """A Windows prefix (``\\\\isis\\inst$\\``) and the Linux directory it is mounted at."""

    windows: str
    linux: str

    @field_validator("linux")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"linux side of a path mapping must be absolute, got {value!r}")
        return value


@dataclass(frozen=True)
class RunFields:
    """The values directory templates are rendered with (all already validated)."""

    facility: str
    instrument: str
    cycle: str | None
    rb_number: str
    run_number: int
    run_version: int

    def as_dict(self) -> dict[str, str]:
        values = {
            "facility": self.facility,
            "instrument": self.instrument,
            "rb_number": self.rb_number,
            "run_number": str(self.run_number),
            "run_version": str(self.run_version),
        }
        if self.cycle is not None:
            values["cycle"] = self.cycle
        return values


def check_template(template: str) -> None:
    """Raise ValueError if ``template`` uses an unknown field or bad format syntax."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"bad template {template!r}: {error}") from error
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"template {template!r} uses {{{name}}}; allowed: "
                + ", ".join(sorted(TEMPLATE_FIELDS))
            )


def render(template: str, *, fields: RunFields) -> str:
    """Fill a (checked) template; PathError when it needs a value the run lacks."""
    values = fields.as_dict()
    try:
        return template.format_map(values)
    except KeyError as error:
        raise PathError(
            f"directory template {template!r} needs {{{error.args[0]}}}, "
            "but the data path has no cycle_NN_N folder"
        ) from error


def parse_cycle(data_path: str) -> str | None:
    """``NN_N`` from the first ``cycle_NN_N`` in a data path, or None."""
    match = _CYCLE_RE.search(data_path.replace("\\", "/"))
    return match.group(1) if match else None


def _windows_key(path: str) -> str:
    return path.replace("\\", "/").lower()


def map_data_path(data_path: str, *, mappings: list[PathMapping]) -> str:
    """A data path as the runner sees it: Windows prefixes mapped, '..' collapsed.

    Windows paths are matched case-insensitively (the share is); a path that still
    is not an absolute POSIX path after mapping is refused.
    """
    if "\x00" in data_path:
        raise PathError("data path contains a NUL character")
    mapped = data_path
    key = _windows_key(data_path)
    for mapping in sorted(mappings, key=lambda m: len(m.windows), reverse=True):
        prefix = _windows_key(mapping.windows)
        if key.startswith(prefix):
            rest = data_path.replace("\\", "/")[len(prefix) :]
            mapped = mapping.linux.rstrip("/") + "/" + rest.lstrip("/")
            break
    if "\\" in mapped or not mapped.startswith("/"):
        raise PathError(f"data path {data_path!r} is not an absolute path with a known mapping")
    return posixpath.normpath(mapped)


def is_within(path: str, *, roots: list[str]) -> bool:
    """True if the normalised absolute ``path`` equals or lies below one of ``roots``."""
    candidate = PurePosixPath(posixpath.normpath(path))
    if not candidate.is_absolute():
        return False
    return any(candidate.is_relative_to(posixpath.normpath(root)) for root in roots)


def require_within(path: str, *, roots: list[str], what: str) -> str:
    """``path`` if it lies within ``roots``; PathError naming ``what`` otherwise."""
    if not is_within(path, roots=roots):
        raise PathError(f"{what} {path!r} is outside the allowed roots ({', '.join(roots)})")
    return path


@dataclass(frozen=True)
class Layout:
    """Where one run's files go (unresolved: the caller checks them on disk)."""

    final_output: str
    log_dir: str
    log_file: str


def plan_layout(
    *,
    fields: RunFields,
    output: str,
    flat_output_template: str,
    version_folder: str,
    log: str,
    log_file: str,
    flat_output: bool,
    overwrite: bool,
) -> Layout:
    """The run's directories from the templates and the message's flags."""
    base = render(flat_output_template if flat_output else output, fields=fields)
    final = base if overwrite else posixpath.join(base, render(version_folder, fields=fields))
    return Layout(
        final_output=posixpath.normpath(final),
        log_dir=posixpath.normpath(render(log, fields=fields)),
        log_file=render(log_file, fields=fields),
    )


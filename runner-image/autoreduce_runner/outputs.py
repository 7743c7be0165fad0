"""Filesystem side of directories: resolving, writability, staged publication.

Output is copied into a staging directory next to each destination and renamed
into place only when every copy succeeded, so a failed run leaves no partial
output in a final location.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from autoreduce_runner.paths import PathError, require_within

# errnos that mean "not allowed to write here" (worth a retry later), not "broken".
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class PermissionProblem(Exception):
    """A directory the run needs is not writable: retryable (``retry_in``)."""


def is_permission_error(error: OSError) -> bool:
    return isinstance(error, PermissionError) or error.errno in _PERMISSION_ERRNOS


def resolve_within(path: str, *, roots: list[Path], what: str) -> str:
    """``path`` with symlinks and '..' resolved, if it lies within ``roots``.

    Only resolves names (readlink); never opens ``path``. Roots are resolved too,
    so a root that is itself a symlink (a mount alias) still works.
    """
    if not path.startswith("/"):
        raise PathError(f"{what} {path!r} is not an absolute path")
    resolved = os.path.realpath(path)
    real_roots = [os.path.realpath(root) for root in roots]
    return require_within(resolved, roots=real_roots, what=what)


def ensure_writable_dir(path: str) -> None:
    """Create ``path`` (and parents) and prove a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".autoreduce-probe-"):
            pass
    except OSError as error:
        if is_permission_error(error):
            raise PermissionProblem(
                f"cannot write to {path}: {error.strerror or error}"
            ) from error
        raise


@dataclass(frozen=True)
class Staged:
    """A full copy of the output waiting next to its destination."""

    staging: Path
    final: Path


def _stage(*, source: Path, final: Path) -> Staged:
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, staging, symlinks=True)
    return Staged(staging=staging, final=final)


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        if source.is_dir() and not source.is_symlink():
            _merge(source, target)
            return
        shutil.rmtree(target)
    elif (target.is_symlink() or target.exists()) and source.is_dir() and not source.is_symlink():
        target.unlink()  # a directory replaces a file of the same name
    os.replace(source, target)


def _merge(source: Path, target: Path) -> None:
    """Move every entry of ``source`` into the existing directory ``target``."""
    for entry in sorted(source.iterdir()):
        _replace(entry, target / entry.name)


def _promote(staged: Staged) -> None:
    if not os.path.lexists(staged.final):
        os.rename(staged.staging, staged.final)
        return
    if not staged.final.is_dir() or staged.final.is_symlink():
        raise FileExistsError(errno.EEXIST, f"{staged.final} exists and is not a directory")
    _merge(staged.staging, staged.final)
    shutil.rmtree(staged.staging, ignore_errors=True)


def discard(staged: list[Staged]) -> None:
    for item in staged:
        shutil.rmtree(item.staging, ignore_errors=True)


def publish(*, source: Path, destinations: list[Path]) -> list[str]:
    """Copy ``source``'s contents to every destination, all staged first.

    Destinations that already exist (``overwrite``, flat output, a dir the script
    returned) are merged into, file by file; new ones appear by a single rename.
    """
    staged: list[Staged] = []
    try:
        for destination in destinations:
            staged.append(_stage(source=source, final=destination))
        for item in staged:
            _promote(item)
    finally:
        discard(staged)  # no-op for promoted ones; removes the rest on failure
    return [str(destination) for destination in destinations]

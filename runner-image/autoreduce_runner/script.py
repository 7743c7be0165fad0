"""Child side: load ``reduce.py`` from text, apply web variables, honour SKIP_RUNS,
call ``main``. Runs only inside the supervised child process (``child.py``).

Standard library only: the child starts fast and carries nothing of the admin.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

WEB_VAR_MODULE = "reduce_vars"
SCRIPT_MODULE = "reduce"


class ScriptFault(Exception):
    """The user's script did something wrong: ``kind`` and ``text`` make the message."""

    def __init__(self, kind: str, text: str, *, detail: str = "") -> None:
        super().__init__(f"{kind} - {text}")
        self.kind = kind
        self.text = text
        self.detail = detail  # a traceback, for the reduction log

    def describe(self) -> str:
        return f"Error in user reduction script: {self.kind} - {self.text}"


@dataclass(frozen=True)
class WebVars:
    """The message's ``reduction_arguments``: overrides for ``reduce_vars``."""

    standard_vars: Mapping[str, Any] = field(default_factory=dict)
    advanced_vars: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> WebVars:
        standard = arguments.get("standard_vars") or {}
        advanced = arguments.get("advanced_vars") or {}
        if not isinstance(standard, Mapping) or not isinstance(advanced, Mapping):
            raise TypeError("reduction_arguments.standard_vars/advanced_vars must be objects")
        return cls(standard_vars=dict(standard), advanced_vars=dict(advanced))


@dataclass(frozen=True)
class ScriptOutcome:
    """What the script decided: skipped (with the reason) or completed."""

    skipped: bool
    output_dirs: list[str] = field(default_factory=list)
    reason: str = ""


# -- web variables ------------------------------------------------------------------


def apply_web_vars(module: types.ModuleType, *, web_vars: WebVars) -> None:
    """Update ``module.standard_vars``/``advanced_vars`` in place (made if absent).

    In place, because scripts hold references to these dicts; the legacy refactor
    that built a new mapping lazily is exactly how overrides got lost.
    """
    for name, overrides in (
        ("standard_vars", web_vars.standard_vars),
        ("advanced_vars", web_vars.advanced_vars),
    ):
        current = getattr(module, name, None)
        if not isinstance(current, dict):
            current = {}
            setattr(module, name, current)
        current.update(overrides)


def empty_web_var(*, web_vars: WebVars) -> types.ModuleType:
    """The ``reduce_vars`` used when the script's folder has none."""
    module = types.ModuleType(WEB_VAR_MODULE)
    module.__doc__ = "Web variables of this run (no reduce_vars.py was found)."
    apply_web_vars(module, web_vars=web_vars)
    return module


class _OverridingLoader(importlib.abc.Loader):
    """Runs the real ``reduce_vars.py`` (if any), then applies the overrides."""

    def __init__(self, inner: importlib.abc.Loader | None, web_vars: WebVars) -> None:
        self._inner = inner
        self._web_vars = web_vars

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec) if self._inner is not None else None

    def exec_module(self, module: types.ModuleType) -> None:
        if self._inner is not None:
            self._inner.exec_module(module)
        apply_web_vars(module, web_vars=self._web_vars)


class _WebVarFinder(importlib.abc.MetaPathFinder):
    """Whoever imports ``reduce_vars`` (wherever on sys.path) gets the overrides."""

    def __init__(self, web_vars: WebVars) -> None:
        self._web_vars = web_vars

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != WEB_VAR_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return importlib.machinery.ModuleSpec(
                fullname, _OverridingLoader(None, self._web_vars)
            )
        spec.loader = _OverridingLoader(spec.loader, self._web_vars)
        return spec


@contextmanager
def web_var_import_hook(*, web_vars: WebVars) -> Iterator[None]:
    """Install the ``reduce_vars`` finder (and forget any cached module) for a block."""
    finder = _WebVarFinder(web_vars)
    saved = sys.modules.pop(WEB_VAR_MODULE, None)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop(WEB_VAR_MODULE, None)
        if saved is not None:
            sys.modules[WEB_VAR_MODULE] = saved


# -- loading and running ------------------------------------------------------------


def _fault_from(error: BaseException, *, when: str) -> ScriptFault:
    detail = "".join(traceback.format_exception(error))
    if isinstance(error, SystemExit):
        return ScriptFault(
            "SystemExit",
            f"the script called sys.exit({error.code!r}) {when}; "
            "a reduction script must return or raise instead",
            detail=detail,
        )
    return ScriptFault(type(error).__name__, str(error) or repr(error), detail=detail)


def load_script(*, text: str, path: str, web_vars: WebVars) -> types.ModuleType:
    """Compile and execute ``reduce.py`` as module ``reduce``; web_var is ensured."""
    try:
        code = compile(text, path, "exec")
    except (SyntaxError, ValueError) as error:
        raise _fault_from(error, when="while compiling") from error
    module = types.ModuleType(SCRIPT_MODULE)
    module.__file__ = path
    sys.modules[SCRIPT_MODULE] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - running reduce.py is the job
    except BaseException as error:  # anything the script raises is its fault
        raise _fault_from(error, when="while loading") from error
    web_var = getattr(module, "web_var", None)
    if isinstance(web_var, types.ModuleType):
        apply_web_vars(web_var, web_vars=web_vars)  # idempotent; covers odd imports
    elif web_var is None:
        module.web_var = empty_web_var(web_vars=web_vars)  # type: ignore[attr-defined]
    return module


def _as_run_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def skip_reason(module: types.ModuleType, *, run_numbers: Sequence[int]) -> str | None:
    """Why the run is skipped (every run number is in SKIP_RUNS), or None."""
    listed = getattr(module, "SKIP_RUNS", None)
    if not listed:
        return None
    try:
        skip = {_as_run_number(item) for item in listed}
    except TypeError:
        return None
    if run_numbers and all(run in skip for run in run_numbers):
        runs = ", ".join(str(run) for run in run_numbers)
        return f"Run {runs} is in the reduction script's SKIP_RUNS: skipped"
    return None


def returned_dirs(value: object) -> list[str]:
    """What ``main`` returned as a list of directory strings (None: no extra ones)."""
    if value is None:
        return []
    items: list[object]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ScriptFault(
            "TypeError",
            f"main() returned {type(value).__name__}; expected a directory path (str) "
            "or a list of them",
        )
    for item in items:
        if not isinstance(item, str) or not item:
            raise ScriptFault(
                "TypeError",
                f"main() returned a list holding {type(item).__name__} {item!r:.80}; "
                "expected only non-empty directory paths (str)",
            )
    return [str(item) for item in items]


def _main_of(module: types.ModuleType) -> Any:
    main = getattr(module, "main", None)
    if not callable(main):
        raise ScriptFault(
            "AttributeError", "reduce.py has no function main(input_file, output_dir)"
        )
    try:
        signature = inspect.signature(main)
    except (TypeError, ValueError):
        return main  # a builtin or C callable: let the call decide
    try:
        signature.bind(input_file="", output_dir="")
    except TypeError as error:
        raise ScriptFault(
            "TypeError",
            f"main{signature} cannot be called as main(input_file=..., output_dir=...): "
            f"{error}",
        ) from error
    return main


def call_main(
    module: types.ModuleType, *, input_file: str | list[str], output_dir: str
) -> list[str]:
    """Call ``main(input_file=, output_dir=)`` and return the extra output dirs."""
    main = _main_of(module)
    try:
        value = main(input_file=input_file, output_dir=output_dir)
    except BaseException as error:  # anything the script raises is its fault
        raise _fault_from(error, when="in main()") from error
    return returned_dirs(value)


def run_script(
    *,
    text: str,
    path: str,
    web_vars: WebVars,
    run_numbers: Sequence[int],
    input_file: str | list[str],
    output_dir: str,
) -> ScriptOutcome:
    """The whole child-side reduction: load, skip check, main."""
    with web_var_import_hook(web_vars=web_vars):
        module = load_script(text=text, path=path, web_vars=web_vars)
        reason = skip_reason(module, run_numbers=run_numbers)
        if reason is not None:
            return ScriptOutcome(skipped=True, reason=reason)
        dirs = call_main(module, input_file=input_file, output_dir=output_dir)
    return ScriptOutcome(skipped=False, output_dirs=dirs)

"""Child-side script handling, in process: web_var substitution, SKIP_RUNS, main()."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
from autoreduce_runner.script import (
    ScriptFault,
    WebVars,
    apply_web_vars,
    empty_web_var,
    load_script,
    returned_dirs,
    run_script,
    skip_reason,
    web_var_import_hook,
)

OVERRIDES = WebVars(standard_vars={"mask": "new.xml", "sum": True},
                    advanced_vars={"bins": [1, 2]})


@pytest.fixture
def clean_modules() -> object:
    saved = dict(sys.modules)
    path = list(sys.path)
    yield None
    for name in set(sys.modules) - set(saved):
        del sys.modules[name]
    sys.path[:] = path


def _script(tmp_path: Path, text: str) -> tuple[str, str]:
    script_dir = tmp_path / "script"
    script_dir.mkdir(exist_ok=True)
    path = script_dir / "reduce.py"
    text = textwrap.dedent(text)
    path.write_text(text)
    return text, str(path)


def test_apply_web_vars_updates_in_place() -> None:
    module = types.ModuleType("reduce_vars")
    standard = {"mask": "old.xml", "keep": 1}
    module.standard_vars = standard  # type: ignore[attr-defined]
    apply_web_vars(module, web_vars=OVERRIDES)
    assert module.standard_vars is standard  # type: ignore[attr-defined]
    assert standard == {"mask": "new.xml", "sum": True, "keep": 1}
    assert module.advanced_vars == {"bins": [1, 2]}  # type: ignore[attr-defined]


def test_empty_web_var_holds_the_overrides() -> None:
    module = empty_web_var(web_vars=OVERRIDES)
    assert module.standard_vars == {"mask": "new.xml", "sum": True}  # type: ignore[attr-defined]


def test_from_arguments_rejects_non_objects() -> None:
    assert WebVars.from_arguments({}).standard_vars == {}
    with pytest.raises(TypeError):
        WebVars.from_arguments({"standard_vars": [1]})


def test_script_importing_reduce_vars_from_its_own_folder_sees_overrides(
    tmp_path: Path, clean_modules: object
) -> None:
    text, path = _script(tmp_path, """
        import os, sys
        sys.path.append(os.path.dirname(os.path.realpath(__file__)))
        import reduce_vars as web_var
        AT_IMPORT = dict(web_var.standard_vars)
    """)
    with web_var_import_hook(web_vars=OVERRIDES):
        module = load_script(text=text, path=path, web_vars=OVERRIDES)
    assert module.AT_IMPORT == {"mask": "new.xml", "sum": True}
    assert module.web_var.advanced_vars == {"bins": [1, 2]}
    assert module.web_var.__name__ == "reduce_vars"  # made: the folder has none


def test_a_real_reduce_vars_keeps_its_defaults_under_the_overrides(
    tmp_path: Path, clean_modules: object
) -> None:
    shared = tmp_path / "instrument_scripts"
    shared.mkdir()
    (shared / "reduce_vars.py").write_text(
        "standard_vars = {'mask': 'default.xml', 'ei': 45}\nadvanced_vars = {'rebin': 0.1}\n"
    )
    text, path = _script(tmp_path, f"""
        import sys
        sys.path.append({str(shared)!r})
        import reduce_vars as web_var
        def main(input_file, output_dir):
            return None
    """)
    with web_var_import_hook(web_vars=OVERRIDES):
        module = load_script(text=text, path=path, web_vars=OVERRIDES)
        assert module.web_var.__file__ == str(shared / "reduce_vars.py")
        assert module.web_var.standard_vars == {"mask": "new.xml", "ei": 45, "sum": True}
        assert module.web_var.advanced_vars == {"rebin": 0.1, "bins": [1, 2]}
    assert "reduce_vars" not in sys.modules  # the hook cleans up after itself


def test_script_without_web_var_gets_an_empty_one(tmp_path: Path, clean_modules: object) -> None:
    text, path = _script(tmp_path, "def main(input_file, output_dir):\n    pass\n")
    module = load_script(text=text, path=path, web_vars=OVERRIDES)
    assert module.web_var.standard_vars == {"mask": "new.xml", "sum": True}


@pytest.mark.parametrize(
    ("skip", "runs", "skipped"),
    [
        ([1, 2, 3], [2], True),
        (["0002"], [2], True),
        ([1], [2], False),
        ([1, 2], [1, 2], True),
        ([1], [1, 2], False),
        (None, [1], False),
        (5, [5], False),  # not a list: ignored, as the legacy admin would have
    ],
)
def test_skip_reason(skip: object, runs: list[int], skipped: bool) -> None:
    module = types.ModuleType("reduce")
    if skip is not None:
        module.SKIP_RUNS = skip  # type: ignore[attr-defined]
    reason = skip_reason(module, run_numbers=runs)
    assert (reason is not None) is skipped
    if reason:
        assert "SKIP_RUNS" in reason


@pytest.mark.parametrize(
    ("value", "dirs"),
    [(None, []), ("/a", ["/a"]), (["/a", "/b"], ["/a", "/b"]), (("/a",), ["/a"]), ([], [])],
)
def test_returned_dirs_accepts_str_and_lists(value: object, dirs: list[str]) -> None:
    assert returned_dirs(value) == dirs


@pytest.mark.parametrize("value", [42, {"a": 1}, ["/a", 3], [""], b"/a"])
def test_returned_dirs_rejects_anything_else(value: object) -> None:
    with pytest.raises(ScriptFault) as fault:
        returned_dirs(value)
    assert fault.value.describe().startswith("Error in user reduction script: TypeError - main()")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("def main(:\n", "SyntaxError"),
        ("raise KeyError('k')\n", "KeyError"),
        ("X = 1\n", "AttributeError"),
        ("def main(a, b, c):\n    pass\n", "TypeError"),
        ("def main(input_file, output_dir):\n    raise RuntimeError('boom')\n", "RuntimeError"),
        ("import sys\ndef main(input_file, output_dir):\n    sys.exit(1)\n", "SystemExit"),
    ],
)
def test_run_script_faults(tmp_path: Path, clean_modules: object, text: str, kind: str) -> None:
    text, path = _script(tmp_path, text)
    with pytest.raises(ScriptFault) as fault:
        run_script(text=text, path=path, web_vars=OVERRIDES, run_numbers=[1], input_file="/d",
                   output_dir=str(tmp_path))
    assert fault.value.kind == kind
    assert fault.value.describe().startswith(f"Error in user reduction script: {kind} - ")


def test_run_script_calls_main_with_keywords(tmp_path: Path, clean_modules: object) -> None:
    text, path = _script(tmp_path, """
        def main(output_dir, input_file, **extra):
            return [output_dir + '/x', input_file]
    """)
    outcome = run_script(text=text, path=path, web_vars=OVERRIDES, run_numbers=[1],
                         input_file="/d", output_dir="/o")
    assert not outcome.skipped and outcome.output_dirs == ["/o/x", "/d"]


def test_run_script_skips_before_main(tmp_path: Path, clean_modules: object) -> None:
    text, path = _script(tmp_path, "SKIP_RUNS = [7]\ndef main(input_file, output_dir):\n    1/0\n")
    outcome = run_script(text=text, path=path, web_vars=OVERRIDES, run_numbers=[7],
                         input_file="/d", output_dir="/o")
    assert outcome.skipped and "7" in outcome.reason

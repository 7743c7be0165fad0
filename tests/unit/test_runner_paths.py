"""Pure path logic of the runner: UNC mapping, cycles, templates, containment."""

from __future__ import annotations

import posixpath

import pytest
from autoreduce_runner.paths import (
    Layout,
    PathError,
    PathMapping,
    RunFields,
    check_template,
    is_within,
    map_data_path,
    parse_cycle,
    plan_layout,
    render,
    require_within,
)
from hypothesis import given
from hypothesis import strategies as st

ISIS = [PathMapping(windows="\\\\isis\\inst$\\", linux="/isis/")]
FIELDS = RunFields(facility="ISIS", instrument="WISH", cycle="23_4", rb_number="1234567",
                   run_number=12345, run_version=2)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\cycle_23_4\\WISH12345.nxs",
         "/isis/NDXWISH/Instrument/data/cycle_23_4/WISH12345.nxs"),
        # The share is case-insensitive; the rest of the path keeps its case.
        ("\\\\ISIS\\Inst$\\NDXWISH\\a.nxs", "/isis/NDXWISH/a.nxs"),
        ("\\\\isis\\inst$/NDXWISH/mixed\\sep.nxs", "/isis/NDXWISH/mixed/sep.nxs"),
        ("/isis/NDXWISH/a.nxs", "/isis/NDXWISH/a.nxs"),
        ("/isis/NDXWISH/../NDXMARI/./a.nxs", "/isis/NDXMARI/a.nxs"),
    ],
)
def test_map_data_path(data: str, expected: str) -> None:
    assert map_data_path(data, mappings=ISIS) == expected


def test_longest_mapping_wins() -> None:
    mappings = [*ISIS, PathMapping(windows="\\\\isis\\inst$\\NDXWISH\\", linux="/wish/")]
    assert map_data_path("\\\\isis\\inst$\\NDXWISH\\x.nxs", mappings=mappings) == "/wish/x.nxs"


@pytest.mark.parametrize(
    "data", ["\\\\other\\share\\x.nxs", "relative/x.nxs", "C:\\data\\x.nxs", "/isis/a\x00b"]
)
def test_unmappable_data_paths_are_refused(data: str) -> None:
    with pytest.raises(PathError):
        map_data_path(data, mappings=ISIS)


def test_mapping_target_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        PathMapping(windows="\\\\x\\", linux="relative")


@pytest.mark.parametrize(
    ("path", "cycle"),
    [
        ("/isis/NDXWISH/Instrument/data/cycle_23_4/WISH.nxs", "23_4"),
        ("\\\\isis\\inst$\\NDXWISH\\Instrument\\data\\CYCLE_09_1\\W.nxs", "09_1"),
        ("/isis/NDXWISH/Instrument/data/cycle_24_12/W.nxs", "24_12"),
        ("/isis/NDXWISH/W.nxs", None),
        ("/isis/cycle_2/W.nxs", None),
    ],
)
def test_parse_cycle(path: str, cycle: str | None) -> None:
    assert parse_cycle(path) == cycle


@pytest.mark.parametrize("template", ["/out/{nope}", "/out/{instrument!r}", "/out/{run_number:05d}",
                                      "/out/{", "/out/{0}"])
def test_bad_templates_fail_loudly(template: str) -> None:
    with pytest.raises(ValueError):
        check_template(template)


def test_render_and_missing_cycle() -> None:
    assert render("/a/{instrument}/{cycle}/{rb_number}/{run_number}/{run_version}",
                  fields=FIELDS) == "/a/WISH/23_4/1234567/12345/2"
    no_cycle = RunFields(**{**FIELDS.__dict__, "cycle": None})
    with pytest.raises(PathError, match="cycle_NN_N"):
        render("/a/{cycle}", fields=no_cycle)


@pytest.mark.parametrize(
    ("flat", "overwrite", "final"),
    [
        (False, False, "/o/WISH/RB1234567/12345/run-version-2"),
        (False, True, "/o/WISH/RB1234567/12345"),
        (True, False, "/o/WISH/RB1234567/run-version-2"),
        (True, True, "/o/WISH/RB1234567"),
    ],
)
def test_plan_layout(flat: bool, overwrite: bool, final: str) -> None:
    layout = plan_layout(
        fields=FIELDS, output="/o/{instrument}/RB{rb_number}/{run_number}",
        flat_output_template="/o/{instrument}/RB{rb_number}",
        version_folder="run-version-{run_version}",
        log="/o/{instrument}/RB{rb_number}/logs", log_file="RB{rb_number}_Run{run_number}.out",
        flat_output=flat, overwrite=overwrite,
    )
    assert layout == Layout(final_output=final, log_dir="/o/WISH/RB1234567/logs",
                            log_file="RB1234567_Run12345.out")


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("/out", True),
        ("/out/a/b", True),
        ("/out/../etc", False),
        ("/outside", False),  # a shared prefix is not containment
        ("/etc/passwd", False),
        ("out/a", False),
        ("/out/a/../../out/b", True),
    ],
)
def test_is_within(path: str, inside: bool) -> None:
    assert is_within(path, roots=["/archive", "/out/"]) is inside


def test_require_within_names_what_was_wrong() -> None:
    expected = r"output directory '/etc' is outside the allowed roots \(/out\)"
    with pytest.raises(PathError, match=expected):
        require_within("/etc", roots=["/out"], what="output directory")


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "c"]), max_size=8))
def test_is_within_agrees_with_normalisation(parts: list[str]) -> None:
    path = "/out/" + "/".join(parts)
    normal = posixpath.normpath(path)
    assert is_within(path, roots=["/out"]) == (normal == "/out" or normal.startswith("/out/"))

"""Which run a raw file name or an outcome message is about (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def run_from_filename(path: str) -> tuple[str | None, int | None]:
    """(instrument, run) from a raw file name like ``WISH00044001.nxs`` (pure).

    Legacy manual submission took both from the file name; either may be None
    when the name does not follow the ``<INSTRUMENT><digits>.<ext>`` pattern.
    """
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0]
    letters = stem.rstrip("0123456789")
    digits = stem[len(letters) :]
    instrument = letters.strip("_-").upper() or None
    return instrument, int(digits) if digits else None


def matches_run(body: Mapping[str, Any], *, instrument: str, run: int, version: int) -> bool:
    """Whether an outcome message is about this run (consumers match it the same way)."""
    runs = body.get("run_number")
    first = min(runs) if isinstance(runs, list) and runs else runs
    try:
        return (
            str(body.get("instrument", "")).upper() == instrument.upper()
            and int(first) == run  # type: ignore[arg-type]
            and int(body.get("run_version") or 0) == version
        )
    except (TypeError, ValueError):
        return False

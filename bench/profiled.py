"""``python -m bench.profiled``: the dispatcher under yappi, toggled by SIGUSR1.

The first SIGUSR1 starts a wall-clock profile of every thread; the second stops it and
writes a summary (JSON) to ``$AUTOREDUCE_PROFILE_OUT``. Wall clock, not CPU, because a
dispatcher held by its API budget spends its time asleep in the rate limiter or
waiting on the apiserver, which a CPU profile would not show. Bench only: py-spy
cannot read processes on the machines we measure on, so the profiler runs inside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yappi

from dispatcher.__main__ import main

# Inclusive wall time of these tells where a run's time goes (summed over threads).
WATCHED = {
    "RateLimiter.acquire": "waiting for the API budget (client-side rate limiter)",
    "Kube._call": "API calls, budget wait included",
    "render_job": "rendering the Job (Jinja2)",
    "StompClient._await_receipt": "waiting for broker receipts",
    "Dispatcher._handle": "handling one pending message (accept or cancel)",
    "Controller.reconcile": "admission: one RB reconciled",
}


def summarise(stats: list[Any], *, top: int = 15) -> dict[str, Any]:
    """Self and inclusive wall time per function, from yappi's function stats."""
    rows = [
        {"function": s.name, "module": _short(s.module), "calls": s.ncall,
         "self_s": round(s.tsub, 3), "inclusive_s": round(s.ttot, 3)}
        for s in stats
    ]  # fmt: skip
    ours = [r for r in rows if r["module"].startswith(("dispatcher/", "autoreduce_common/"))]
    watched = {}
    for row in rows:
        label = WATCHED.get(row["function"])
        if label and row["module"].startswith(("dispatcher/", "autoreduce_common/")):
            watched[row["function"]] = {**row, "what": label,
                                        "per_call_ms": _per_call_ms(row)}  # fmt: skip
    return {
        "clock": "wall, summed over threads",
        "watched": watched,
        "top_self_ours": sorted(ours, key=lambda r: -r["self_s"])[:top],
        "top_self_all": sorted(rows, key=lambda r: -r["self_s"])[:top],
    }


def _per_call_ms(row: dict[str, Any]) -> float:
    return round(1000 * float(row["inclusive_s"]) / max(int(row["calls"]), 1), 2)


def _short(module: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in module:
            return module.split(marker, 1)[1]
    parts = Path(module).parts
    for root in ("dispatcher", "autoreduce_common"):
        if root in parts:
            return "/".join(parts[parts.index(root):])
    return module


def _toggle(*_: Any) -> None:
    if not yappi.is_running():
        yappi.clear_stats()
        yappi.set_clock_type("wall")
        yappi.start(builtins=False, profile_threads=True)
        return
    yappi.stop()
    summary = summarise(list(yappi.get_func_stats()))
    out = Path(os.environ["AUTOREDUCE_PROFILE_OUT"])
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(summary, indent=2))
    partial.rename(out)  # the bench polls for ``out``: never let it read half a file


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _toggle)
    sys.exit(main())

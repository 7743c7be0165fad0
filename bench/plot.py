"""The busy cycle as a picture: what an operator would watch, once a second.

matplotlib with the Agg backend (no display); called by ``python -m bench`` after the
cycle scenario, and on its own: ``python -m bench.plot RESULTS.json OUT.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here

import matplotlib.pyplot as plt  # after the backend is chosen

LINES = (
    ("waiting", "runs waiting (suspended Jobs: RB held or caps)", "tab:gray"),
    ("pending", "pods pending (no node has room: Unschedulable)", "tab:red"),
    ("running", "pods running", "tab:green"),
    ("nodes", "nodes in the pool", "tab:blue"),
)


def plot_cycle(result: dict[str, Any], out: Path, *, title: str) -> Path:
    """Draw ``result`` (the cycle scenario's figures) to ``out`` (a PNG)."""
    series = result["series"]
    times = [s["t"] for s in series]
    figure, axes = plt.subplots(figsize=(10, 5), dpi=110)
    for key, label, colour in LINES:
        axes.step(times, [s[key] for s in series], where="post", label=label, color=colour,
                  linewidth=2.2 if key == "nodes" else 1.6)
    for event in result.get("pool_events", []):
        what = str(event["event"])
        node_event = what.startswith("node")
        axes.axvline(event["t"], color="tab:blue" if node_event else "black",
                     linestyle=":" if node_event else "--", linewidth=0.8, alpha=0.6)
        if not node_event:
            axes.annotate(what, (event["t"], axes.get_ylim()[1]), rotation=90, fontsize=7,
                          va="top", ha="right")
    axes.set_xlabel("seconds since the first wave")
    axes.set_ylabel("count")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def title_of(result: dict[str, Any]) -> str:
    outcomes = result.get("outcomes") or {}
    return (f"Busy cycle on real nodes: {result.get('runs')} runs, pool of up to "
            f"{result.get('max_nodes_used')} nodes; {outcomes.get('complete', 0)} Complete, "
            f"{len(outcomes.get('runs_without_exactly_one', []))} without exactly one outcome")


def main(argv: list[str]) -> int:
    results, out = Path(argv[0]), Path(argv[1])
    cycle = json.loads(results.read_text())["cycle"]
    print(plot_cycle(cycle, out, title=title_of(cycle)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

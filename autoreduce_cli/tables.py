"""Text layout shared by the human views: kubectl-style ages and plain tables (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def age(seconds: float | None) -> str:
    """kubectl-style age: 45s, 3m12s, 2h5m, 4d3h ("-" when unknown)."""
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s < 600 else f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86_400}d{(s % 86_400) // 3600}h"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart (the last column is not padded)."""
    materialised = [list(map(str, row)) for row in rows]
    widths = [len(h) for h in headers]
    for row in materialised:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *materialised]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

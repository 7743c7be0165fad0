"""Targets, the table, and the results files (pure except ``write``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import ratio

SECTIONS = ("machine", "settings", "limit", "dispatch", "burst", "handoff", "scale", "poster",
            "startup", "cycle", "targets")
Row = tuple[str, str, str, str]  # figure, value, beside the limit / note, met


def _get(results: dict[str, Any], *path: str | int) -> Any:
    value: Any = results
    for key in path:
        if isinstance(value, dict):
            value = value.get(str(key)) if isinstance(key, str) else None
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def _num(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _rate_at(results: dict[str, Any], offered: float) -> dict[str, Any] | None:
    for rate in _get(results, "dispatch", "rates") or []:
        if rate.get("offered_per_s") == offered:
            return dict(rate)
    return None


def _check(value: float | None, test: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a"
    return "met" if test(value) else "NOT met"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Where we stand on each target (reported, never asserted)."""
    limit_p99 = _get(results, "limit", "sequential", "p99")
    limit_rate = _get(results, "limit", "sequential", "runs_per_s")
    at20 = _rate_at(results, 20) or {}
    p99_20 = _get(at20, "exists", "p99")
    at100 = _rate_at(results, 100) or {}
    scale_runs = _get(results, "scale", "runs")
    at = f" (at {scale_runs} runs)" if scale_runs else ""
    rows = [
        ("dispatch p99 at 20 runs/s <= 2x the limit's p99",
         ratio(p99_20, limit_p99), lambda v: v <= 2, "x the limit"),
        ("offered 100 runs/s (prefetch 1): achieved >= 80% of the sequential limit's runs/s",
         ratio(at100.get("achieved_exists_per_s"), limit_rate), lambda v: v >= 0.8,
         "of the limit"),
        ("burst: accepted >= 80% of the sequential limit's runs/s",
         ratio(_get(results, "burst", "accepted_per_s"), limit_rate), lambda v: v >= 0.8,
         "of the limit"),
        ("hand-off p50 < 250 ms", _get(results, "handoff", "from_terminal_condition", "p50"),
         lambda v: v < 0.25, "s"),
        ("hand-off p99 < 1 s", _get(results, "handoff", "from_terminal_condition", "p99"),
         lambda v: v < 1.0, "s"),
        (f"resident memory < 300 MB{at}", _get(results, "scale", "rss_mb"),
         lambda v: v < 300, "MB"),
        (f"restart to next admission < 15 s{at}: a waiting run, after its holder finished",
         _get(results, "scale", "restart", "restart_to_next_admission_s"), lambda v: v < 15, "s"),
        (f"restart to next admission < 15 s{at}: a new run on a free RB",
         _get(results, "scale", "restart", "new_run_admitted_after_s"), lambda v: v < 15, "s"),
        ("<= 4 API writes per run (happy path: free RB)",
         _get(results, "dispatch", "api", "dispatcher_writes_per_run"), lambda v: v <= 4,
         "writes"),
        ("message -> ReductionStarted p50 <= 1.2x raw Job -> pod Running p50 (real node)",
         _get(results, "startup", "started_p50_over_raw_running_p50"), lambda v: v <= 1.2,
         "x the raw"),
    ]  # fmt: skip
    return [
        {"target": name, "value": value, "unit": unit, "status": _check(value, test)}
        for name, value, test, unit in rows
    ]


def table_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    seq = _get(results, "limit", "sequential") or {}
    conc = _get(results, "limit", "concurrent") or {}
    adm = _get(results, "limit", "sequential_with_admission") or {}
    rows.append(("LIMIT Job+ConfigMap, sequential",
                 f"p50 {_ms(seq.get('p50'))} p99 {_ms(seq.get('p99'))}",
                 f"{_num(seq.get('runs_per_s'))} runs/s", ""))
    rows.append((f"LIMIT Job+ConfigMap, {conc.get('threads', '?')} threads",
                 f"p50 {_ms(conc.get('p50'))} p99 {_ms(conc.get('p99'))}",
                 f"{_num(conc.get('runs_per_s'))} runs/s", ""))
    rows.append(("LIMIT + Lease + unsuspend, sequential",
                 f"p50 {_ms(adm.get('p50'))} p99 {_ms(adm.get('p99'))}", "", ""))
    direct = _get(results, "limit", "sequential_direct") or {}
    rows.append(("LIMIT Lease + running Job (message inline), sequential",
                 f"p50 {_ms(direct.get('p50'))} p99 {_ms(direct.get('p99'))}",
                 f"{_num(direct.get('runs_per_s'))} runs/s; the dispatcher's own writes", ""))
    rows.append(("render Job+ConfigMap (client CPU)",
                 _num(_get(results, "limit", "render_ms_mean"), " ms"), "per run", ""))
    limit_p99 = seq.get("p99")
    limit_rate = conc.get("runs_per_s")
    for rate in _get(results, "dispatch", "rates") or []:
        exists, admitted = rate.get("exists") or {}, rate.get("admitted") or {}
        rows.append((
            f"dispatch @ {rate['offered_per_s']:g}/s: Job exists",
            f"p50 {_ms(exists.get('p50'))} p95 {_ms(exists.get('p95'))} "
            f"p99 {_ms(exists.get('p99'))}",
            f"p99 {_num(ratio(exists.get('p99'), limit_p99))}x limit; "
            f"{_num(rate.get('achieved_exists_per_s'))} runs/s",
            "",
        ))  # fmt: skip
        rows.append((
            f"dispatch @ {rate['offered_per_s']:g}/s: admitted",
            f"p50 {_ms(admitted.get('p50'))} p95 {_ms(admitted.get('p95'))} "
            f"p99 {_ms(admitted.get('p99'))}",
            f"p99 {_num(ratio(admitted.get('p99'), adm.get('p99')))}x limit+admission",
            "",
        ))  # fmt: skip
    burst = results.get("burst") or {}
    rows.append((f"burst {burst.get('runs', '?')} runs / {burst.get('rbs', '?')} RBs: accepted",
                 _num(burst.get("accepted_s"), " s"),
                 f"{_num(burst.get('accepted_per_s'))} runs/s = "
                 f"{_num(ratio(burst.get('accepted_per_s'), limit_rate), '', 2)}x limit", ""))
    hand = results.get("handoff") or {}
    term = hand.get("from_terminal_condition") or {}
    rows.append(("hand-off: Job finished -> next admitted",
                 f"p50 {_ms(term.get('p50'))} p99 {_ms(term.get('p99'))}",
                 "legacy 10 s poll: p50 ~5 s p99 ~9.9 s; 30 s autoscaler poll: ~15 s / ~29.7 s",
                 ""))
    scale = results.get("scale") or {}
    api = scale.get("api") or {}
    rows.append((f"scale {scale.get('waiting', '?')} waiting: dispatcher RSS",
                 _num(scale.get("rss_mb"), " MB"), f"peak {_num(scale.get('peak_rss_mb'), ' MB')}",
                 ""))
    rows.append(("scale: CPU per run", _num(_mul(scale.get("cpu_s_per_run"), 1000), " ms"),
                 f"idle {_num(scale.get('idle_cpu_percent'))}% CPU", ""))
    rows.append(("scale: API requests per run",
                 f"{_num(api.get('dispatcher_writes_per_run'), '', 2)} writes, "
                 f"{_num(api.get('dispatcher_reads_per_run'), '', 2)} reads",
                 f"all clients: {_num(api.get('all_requests_per_run'), '', 2)}", ""))
    etcd = scale.get("etcd_db_mb") or [None, None]
    rows.append(("scale: etcd database file", _num(etcd[1], " MB"),
                 f"before the runs: {_num(etcd[0], ' MB')}", ""))
    restart = scale.get("restart") or {}
    rows.append(("scale: restart -> next admission",
                 _num(restart.get("restart_to_next_admission_s"), " s"),
                 f"consuming after {_num(restart.get('consuming_after_s'))} s; a new run "
                 f"admitted after {_num(restart.get('new_run_admitted_after_s'))} s; Job "
                 f"list in after {_num(restart.get('job_list_s'))} s", ""))
    happy = _get(results, "dispatch", "api") or {}
    rows.append(("happy path (free RB): API per run",
                 f"{_num(happy.get('dispatcher_writes_per_run'), '', 2)} writes, "
                 f"{_num(happy.get('dispatcher_reads_per_run'), '', 2)} reads",
                 f"{_num(happy.get('dispatcher_writes_excluding_events_per_run'), '', 2)} "
                 "writes without Events", ""))
    posting = results.get("poster") or {}
    for mode in ("direct", "sidecar"):
        figures = posting.get(mode) or {}
        started, complete = figures.get("to_started") or {}, figures.get("to_complete") or {}
        rows.append((f"run, {mode}: sent -> Started, -> Complete",
                     f"p50 {_ms(started.get('p50'))}, {_ms(complete.get('p50'))}",
                     "the poster sidecar's cost" if mode == "sidecar" else "no sidecar",
                     ""))
    rows.append(("poster sidecar: extra per run (p50)",
                 _num(posting.get("started_p50_extra_s"), " s"),
                 f"to Complete {_num(posting.get('complete_p50_extra_s'), ' s')}", ""))
    start = results.get("startup") or {}
    raw_side, product_side = start.get("raw") or {}, start.get("product") or {}
    rows.append(("LIMIT raw Job -> pod Running (real node)",
                 f"p50 {_ms(_get(raw_side, 'to_running', 'p50'))} "
                 f"p99 {_ms(_get(raw_side, 'to_running', 'p99'))}",
                 f"its runner's Started: p50 {_ms(_get(raw_side, 'to_started', 'p50'))}", ""))
    rows.append(("message -> ReductionStarted (real node)",
                 f"p50 {_ms(_get(product_side, 'to_started', 'p50'))} "
                 f"p99 {_ms(_get(product_side, 'to_started', 'p99'))}",
                 f"p50 {_num(start.get('started_p50_over_raw_running_p50'), '', 2)}x the raw "
                 "pod Running", ""))
    busy = results.get("cycle") or {}
    if busy.get("series"):
        outcomes = busy.get("outcomes") or {}
        missing = outcomes.get("runs_without_exactly_one") or []
        rows.append(("busy cycle: runs, one outcome each",
                     f"{busy.get('runs')} runs, {len(missing)} without exactly one",
                     f"{outcomes.get('complete', 0)} Complete, {outcomes.get('error', 0)} Error",
                     ""))
        rows.append(("busy cycle: most pods pending, nodes used",
                     f"{busy.get('max_pending')} pending, {busy.get('max_nodes_used')} nodes",
                     f"all finished at {_num(busy.get('all_finished_s'))} s "
                     f"(picture: {busy.get('png', 'not drawn')})", ""))
    for target in results.get("targets") or []:
        value = target["value"]
        shown = "n/a" if value is None else f"{value:.2f} {target['unit']}"
        rows.append((f"TARGET {target['target']}", shown, "", target["status"]))
    return rows


def _mul(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def render_table(rows: list[Row]) -> str:
    header: Row = ("figure", "value", "beside the limit / note", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    return "\n".join(lines)


def render_markdown(results: dict[str, Any], rows: list[Row]) -> str:
    machine = results.get("machine") or {}
    settings = results.get("settings") or {}
    lines = [
        "# Benchmark results",
        "",
        f"Mode `{settings.get('mode')}`, {results.get('finished_at', '')}; "
        f"written by `scripts/bench.sh` (see bench/README.md). Figures are noisy: other",
        "work shared the machine; the load average is recorded with every scenario.",
        "",
        f"- Machine: {machine.get('cpu_model')}, {machine.get('cores')} cores, "
        f"{machine.get('memory_mb')} MB, kernel {machine.get('kernel')}, "
        f"Python {machine.get('python')}, {machine.get('kube_apiserver')}",
        f"- Commit measured: {machine.get('commit', 'not recorded')}",
        f"- Load average (1/5/15 min): start {machine.get('load_at_start')}, "
        f"end {machine.get('load_at_end')}",
        f"- Dispatcher API budget: api_qps={settings.get('api_qps')}, "
        f"api_burst={settings.get('api_burst')} ({settings.get('budget_note', '')}); "
        f"concurrency={settings.get('concurrency')}",
        "",
        "| figure | value | beside the limit / note | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows]
    errors = {k: v.get("error") for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "## Scenario errors", ""]
        lines += [f"- {k}: {v}" for k, v in errors.items()]
    lines += _profile(results)
    lines += _before_after(results)
    lines += ["", "Raw figures: `latest.json` next to this file.", ""]
    return "\n".join(lines)


def previous(path: Path) -> dict[str, Any] | None:
    """The last run's headline (when, commit, mode, targets), kept as "before"."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {
        "finished_at": old.get("finished_at"),
        "commit": (old.get("machine") or {}).get("commit", "before commits were recorded"),
        "mode": (old.get("settings") or {}).get("mode"),
        "targets": old.get("targets") or [],
    }


def _before_after(results: dict[str, Any]) -> list[str]:
    before = results.get("previous") or {}
    if not before.get("targets"):
        return []
    old = {t["target"].split(" (at ")[0]: t for t in before["targets"]}
    lines = [
        "",
        f"## Before / after (before: the previous run, {before.get('finished_at')}, "
        f"commit {before.get('commit')}, mode {before.get('mode')})",
        "",
        "| target | before | after | status now |",
        "|---|---|---|---|",
    ]
    for target in results.get("targets") or []:
        was = old.get(target["target"].split(" (at ")[0]) or {}
        lines.append(
            f"| {target['target']} | {_num(was.get('value'), ' ' + was.get('unit', ''), 2)} | "
            f"{_num(target['value'], ' ' + target['unit'], 2)} | {target['status']} |"
        )
    return lines


def _profile(results: dict[str, Any]) -> list[str]:
    rates = _get(results, "dispatch", "rates") or []
    profiled = [r for r in rates if isinstance(r.get("profile"), dict)]
    if not profiled or "watched" not in profiled[0]["profile"]:
        return []
    rate, prof = profiled[0], profiled[0]["profile"]
    lines = [
        "",
        f"## Where the dispatcher's time goes at {rate.get('offered_per_s')} runs/s "
        "(yappi, wall clock summed over threads)",
        "",
        "| function | what | calls | inclusive s | per call ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in sorted(prof["watched"].items(), key=lambda kv: -kv[1]["inclusive_s"]):
        lines.append(f"| `{name}` | {row['what']} | {row['calls']} | {row['inclusive_s']} | "
                     f"{row['per_call_ms']} |")  # fmt: skip
    top = ", ".join(f"`{r['function']}` {r['self_s']} s" for r in prof.get("top_self_ours", [])[:6])
    lines += ["", f"Most self time in our code: {top}."]
    return lines


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path, str]:
    results["targets"] = targets(results)
    rows = table_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "latest.json", out / "latest.md"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(render_markdown(results, rows))
    return json_path, md_path, render_table(rows)

"""The pure parts of the operator's view: rows, ages, tables, messages, dead letters,
argument parsing, the JSON log formatter, the Waiting notes and the Grafana dashboard."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoreduce_cli import cli, status
from autoreduce_cli.rows import autoscaler_notes, row_for
from dispatcher import failures
from dispatcher.admission import Caps
from dispatcher.events import caps_note, held_note
from dispatcher.identity import Labels, RunKey
from dispatcher.logs import JsonFormatter, job_logger, run_logger
from dispatcher.metrics import Metrics
from tests.harness.tools import helm_binary

LABELS = Labels("autoreduce.io")
NOW = 1_700_000_000.0
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "autoreduce"


def stamp(seconds_ago: float) -> str:
    return datetime.fromtimestamp(NOW - seconds_ago, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(
    name: str, *, rb: str = "1920001", instrument: str = "WISH", run: int = 1, version: int = 0,
    suspended: bool = False, created: float = 60, started: float | None = None,
    conditions: list[dict[str, Any]] | None = None, priority: int = 4, enqueued: int = 0,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    status_: dict[str, Any] = {"conditions": conditions or []}
    if started is not None:
        status_["startTime"] = stamp(started)
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": stamp(created),
            "labels": {
                "autoreduce.io/managed": "true",
                "autoreduce.io/rb-number": rb,
                "autoreduce.io/instrument": instrument,
                "autoreduce.io/run-number": str(run),
                "autoreduce.io/run-version": str(version),
            },
            "annotations": {
                "autoreduce.io/priority": str(priority),
                "autoreduce.io/enqueued-at": str(enqueued),
                "autoreduce.io/run": f"{instrument} run {run} v{version} (RB {rb})",
                **(annotations or {}),
            },
        },
        "spec": {"suspend": suspended},
        "status": status_,
    }


def done(kind: str, ago: float) -> list[dict[str, Any]]:
    return [{"type": kind, "status": "True", "lastTransitionTime": stamp(ago),
             "reason": "DeadlineExceeded" if kind == "Failed" else "",
             "message": "Job was active longer than specified deadline" if kind == "Failed"
             else ""}]


def pod(job_name: str, *, phase: str = "Running", termination: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    statuses = []
    if termination is not None:
        statuses = [{"state": {"terminated": {"message": json.dumps(termination)}}}]
    return {
        "metadata": {"name": f"{job_name}-abcde",
                     "labels": {"batch.kubernetes.io/job-name": job_name}},
        "status": {"phase": phase, "containerStatuses": statuses},
    }


LEASE = {"metadata": {"labels": {"autoreduce.io/rb-number": "1920001"}},
         "spec": {"holderIdentity": "red-wish-1-v0"}}


# -- ages and tables ---------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (-3, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m0s"), (192, "3m12s"),
    (600, "10m"), (3599, "59m"), (3600, "1h0m"), (7500, "2h5m"), (86_400, "1d0h"),
    (4 * 86_400 + 3 * 3600, "4d3h"),
])
def test_age_reads_like_kubectl(seconds: float | None, text: str) -> None:
    assert status.age(seconds) == text


def test_parse_time_accepts_api_stamps_and_refuses_junk() -> None:
    assert status.parse_time("2023-11-14T22:13:20Z") == NOW
    assert status.parse_time(None) is None and status.parse_time("yesterday") is None


def test_table_aligns_columns_and_leaves_no_trailing_space() -> None:
    text = status.table(["A", "LONGER", "Z"], [["xxxx", "y", "last column can be long"]])
    first, second = text.splitlines()
    assert first == "A     LONGER  Z"
    assert second == "xxxx  y       last column can be long"


# -- rows -----------------------------------------------------------------------------------


def test_running_waiting_and_finished_rows() -> None:
    jobs = [
        job("red-wish-1-v0", run=1, started=30, created=40),
        job("red-wish-2-v0", run=2, suspended=True, created=20, enqueued=2),
        job("red-wish-3-v0", run=3, suspended=True, created=10, priority=9, enqueued=3),
        job("red-let-9-v0", rb="1920002", instrument="LET", run=9, suspended=True, created=5),
        job("red-wish-0-v0", run=0, created=300, conditions=done("Complete", 100)),
        job("red-mari-5-v0", rb="5", instrument="MARI", run=5, created=400,
            conditions=done("Failed", 200)),
        job("red-gem-7-v0", rb="7", instrument="GEM", run=7, created=500,
            conditions=done("Failed", 50)),
    ]
    pods = [
        pod("red-wish-1-v0"),
        pod("red-gem-7-v0", phase="Failed",
            termination={"outcome": "Error", "posted": True, "message": "ZeroDivisionError"}),
    ]
    result = status.summarize(jobs=jobs, pods=pods, leases=[LEASE], labels=LABELS, now=NOW)
    (running,) = result.running
    assert (running.job, running.in_state_s, running.age_s) == ("red-wish-1-v0", 30, 40)
    assert running.detail == "red-wish-1-v0-abcde Running"
    # Waiting in admission order: priority first, then arrival.
    assert [r.job for r in result.waiting] == ["red-wish-3-v0", "red-let-9-v0", "red-wish-2-v0"]
    assert result.waiting[0].detail == "RB held by red-wish-1-v0"
    assert result.waiting[1].detail.startswith("waiting for a slot")
    # Finished newest first, with the outcome from the runner's termination message.
    assert [(r.job, r.outcome) for r in result.finished] == [
        ("red-gem-7-v0", "Error"), ("red-wish-0-v0", "Complete"), ("red-mari-5-v0", "Failed")]
    assert result.finished[0].detail == "ZeroDivisionError"
    assert result.finished[2].detail.startswith("DeadlineExceeded: Job was active")
    assert result.by_instrument["WISH"] == {"waiting": 2, "running": 1, "finished": 1}
    assert result.holders == {"1920001": "red-wish-1-v0"}


def test_a_pending_pod_shows_why_it_is_not_running() -> None:
    unschedulable = pod("red-wish-5-v0", phase="Pending")
    unschedulable["status"]["conditions"] = [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    pulling = pod("red-wish-6-v0", phase="Pending")
    pulling["status"]["containerStatuses"] = [{"state": {"waiting": {
        "reason": "ImagePullBackOff"}}}]
    jobs = [job("red-wish-5-v0", run=5, started=5, created=9),
            job("red-wish-6-v0", rb="6", run=6, started=5, created=9)]
    result = status.summarize(jobs=jobs, pods=[unschedulable, pulling], leases=[],
                              labels=LABELS, now=NOW)
    details = {r.job: r.detail for r in result.running}
    assert details["red-wish-5-v0"] == (
        "red-wish-5-v0-abcde Pending (Unschedulable: 0/1 nodes are available: "
        "1 Insufficient cpu.)")
    assert details["red-wish-6-v0"] == "red-wish-6-v0-abcde Pending (ImagePullBackOff)"


def test_a_finished_run_shows_the_outcome_the_dispatcher_posted_for_it() -> None:
    """A pod killed for memory: the Job says BackoffLimitExceeded, the ReductionError
    the dispatcher posted says why; status shows the latter."""
    verdict = failures.Verdict(False, "OOMKilled", "Reduction ran out of memory (limit 1Gi)",
                               transient=False)
    jobs = [job("red-wish-4-v0", run=4, created=60, conditions=done("Failed", 10),
                annotations={"autoreduce.io/outcome": "Done",
                             "autoreduce.io/outcome-verdict": failures.render_verdict(verdict)})]
    (row,) = status.summarize(jobs=jobs, pods=[], leases=[], labels=LABELS, now=NOW).finished
    assert (row.outcome, row.detail) == ("Error", "Reduction ran out of memory (limit 1Gi)")


def test_cancelled_runs_and_filters_and_recent_limit() -> None:
    jobs = [job(f"red-wish-{n}-v0", run=n, created=100 + n,
                conditions=done("Complete", 10 + n)) for n in range(15)]
    jobs.append(job("red-wish-99-v0", run=99, created=5, conditions=done("Failed", 1),
                    annotations={"autoreduce.io/outcome": "Error"}))
    jobs.append(job("red-let-1-v0", rb="2", instrument="LET", started=3))
    result = status.summarize(jobs=jobs, pods=[], leases=[], labels=LABELS, now=NOW, recent=3)
    assert [r.job for r in result.finished] == ["red-wish-99-v0", "red-wish-0-v0",
                                                 "red-wish-1-v0"]
    assert result.finished[0].outcome == "Cancelled"
    assert result.finished_total == 16
    only = status.summarize(jobs=jobs, pods=[], leases=[LEASE], labels=LABELS, now=NOW,
                            instrument="let", rb="2")
    assert [r.job for r in only.running] == ["red-let-1-v0"] and not only.finished
    assert only.holders == {}


def test_format_status_and_json_views() -> None:
    jobs = [job("red-wish-1-v0", started=30), job("red-wish-2-v0", run=2, suspended=True)]
    result = status.summarize(jobs=jobs, pods=[], leases=[LEASE], labels=LABELS, now=NOW)
    text = status.format_status(result)
    assert "RUNNING (1)" in text and "WAITING (1, in admission order per RB)" in text
    assert "RB held by red-wish-1-v0" in text and "RECENTLY FINISHED (0 of 0)" in text
    assert re.search(r"WISH\s+1\s+1\s+0", text)  # by instrument
    assert "RB HELD BY" in text
    machine = status.status_json(result)
    assert json.loads(json.dumps(machine))["waiting"][0]["detail"] == "RB held by red-wish-1-v0"
    assert machine["running"][0]["in_state_s"] == 30
    empty = status.format_status(status.Status())
    assert "RUNNING (0)" in empty and re.search(r"\n-\s+0\s+0\s+0\n", empty)


def test_termination_message_ignores_junk() -> None:
    assert failures.runner_report({"status": {"containerStatuses": [
        {"state": {"terminated": {"message": "not json"}}}]}}) is None
    assert failures.runner_report({}) is None


# -- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [
    ("/isis/NDXWISH/Instrument/data/cycle_23_4/WISH00044001.nxs", ("WISH", 44001)),
    (r"\\isis\inst$\NDXLET\Instrument\data\cycle_23_4\LET00009001.nxs", ("LET", 9001)),
    ("mari_25581.raw", ("MARI", 25581)),
    ("/data/run.nxs", ("RUN", None)),
    ("/data/12345.nxs", (None, 12345)),
])
def test_instrument_and_run_from_the_file_name(path: str, expected: tuple[Any, Any]) -> None:
    assert status.run_from_filename(path) == expected


@pytest.mark.parametrize(("body", "match"), [
    ({"instrument": "wish", "run_number": 7, "run_version": 1}, True),
    ({"instrument": "WISH", "run_number": "0007", "run_version": 1}, True),
    ({"instrument": "WISH", "run_number": [9, 7], "run_version": 1}, True),
    ({"instrument": "WISH", "run_number": 7}, False),
    ({"instrument": "LET", "run_number": 7, "run_version": 1}, False),
    ({"instrument": "WISH", "run_number": "x", "run_version": 1}, False),
    ({"instrument": "WISH", "run_number": None, "run_version": 1}, False),
])
def test_outcome_matches_its_run(body: dict[str, Any], match: bool) -> None:
    assert status.matches_run(body, instrument="WISH", run=7, version=1) is match


def test_dead_letters_parse_and_format() -> None:
    good = status.dead_letter(
        {"message-id": "ID:1", "timestamp": str(int(NOW * 1000) - 90_000),
         "autoreduce-reason": "run_number must be an integer"},
        json.dumps({"instrument": "WISH", "run_number": 0}).encode())
    junk = status.dead_letter({"message-id": "ID:2", "timestamp": "x"}, b"\xff{not json")
    assert (good.instrument, good.run) == ("WISH", "0")
    assert good.reason == "run_number must be an integer"
    assert (junk.instrument, junk.run, junk.timestamp_ms) == ("", "", 0)
    listing = status.format_dead_letters([good, junk], now=NOW)
    assert re.search(r"ID:1\s+1m30s\s+WISH", listing) and "ID:2" in listing
    assert status.format_dead_letters([], now=NOW) == "dead-letter queue is empty\n"
    shown = status.format_dead_letter(good)
    assert "reason (autoreduce-reason): run_number must be an integer" in shown
    assert '"instrument": "WISH"' in shown
    assert "\ufffd{not json" in status.format_dead_letter(junk)


# -- command line -------------------------------------------------------------------------


def test_cli_arguments() -> None:
    p = cli.parser()
    args = p.parse_args(["status", "--watch", "-o", "json"])
    assert (args.watch, args.output, args.count) == (2.0, "json", 0)
    args = p.parse_args(["submit", "/isis/WISH00000001.nxs", "reduce.py", "--rb", "1",
                         "--no-wait"])
    assert args.wait is False and args.func is cli.cmd_submit and args.output == "text"
    args = p.parse_args(["rerun", "red-wish-1-v0"])
    assert args.job == "red-wish-1-v0" and args.func is cli.cmd_retry and args.wait
    args = p.parse_args(["dead-letters", "requeue", "ID:1", "ID:2", "-o", "json"])
    assert args.ids == ["ID:1", "ID:2"] and args.func is cli.cmd_dlq_requeue
    with pytest.raises(SystemExit):
        p.parse_args(["cancel", "--instrument", "WISH", "--run", "1"])  # no --rb


def test_cli_reports_bad_settings_and_arguments(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "settings.yaml"
    bad.write_text("concurrency: 0\n")
    assert cli.main(["status", "--config", str(bad)]) == cli.EXIT_USAGE
    assert "bad settings" in capsys.readouterr().err
    assert cli._arguments(None) == {"standard_vars": {}, "advanced_vars": {}}
    assert cli._arguments('{"standard_vars": {"a": 1}}') == {
        "standard_vars": {"a": 1}, "advanced_vars": {}}
    (tmp_path / "args.json").write_text('{"advanced_vars": {"b": 2}}')
    assert cli._arguments(f"@{tmp_path / 'args.json'}")["advanced_vars"] == {"b": 2}
    for text in ("[1]", "{nope"):
        with pytest.raises(cli.CliError):
            cli._arguments(text)


def test_render_needs_no_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    message = {"data": "/isis/x/WISH1.nxs", "instrument": "WISH", "rb_number": "1920001",
               "run_number": 1, "reduction_script": "def main(**kw): pass",
               "reduction_arguments": {}}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(message))
    settings = tmp_path / "s.yaml"
    settings.write_text("jobs: {namespace: reduction}\n")
    assert cli.main(["render", str(path), "--config", str(settings)]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert rendered["kind"] == "Job" and rendered["metadata"]["namespace"] == "reduction"
    path.write_text(json.dumps({**message, "cancel": True}))
    assert cli.main(["render", str(path), "--config", str(settings)]) == cli.EXIT_USAGE


# -- logs and events -----------------------------------------------------------------------


def test_json_log_lines_carry_the_run() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.cli.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    key = RunKey("ISIS", "WISH", (44001,), 2, "1920001")
    run_logger(logger, key).info("accepted %s", "it", extra={"note": 1})
    job_logger(logger, LABELS, job("red-wish-5-v1", run=5, version=1)).warning("posted")
    logger.info("not about a run")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "accepted it"
    assert {k: first[k] for k in ("instrument", "run", "version", "rb")} == {
        "instrument": "WISH", "run": 44001, "version": 2, "rb": "1920001"}
    assert first["job"].startswith("red-wish-44001-v2-")
    assert (second["job"], second["run"], second["version"], second["level"]) == (
        "red-wish-5-v1", 5, 1, "WARNING")
    assert "instrument" not in third


def test_waiting_notes_name_the_holder_or_the_cap() -> None:
    holder = job("red-wish-1-v0")
    assert held_note(LABELS, rb="1920001", holder=holder, holder_name="red-wish-1-v0") == (
        "waiting for RB 1920001: held by Job red-wish-1-v0 (WISH run 1 v0 (RB 1920001))")
    assert held_note(LABELS, rb="1", holder=None, holder_name="gone") == (
        "waiting for RB 1: held by Job gone")
    running = [job("a"), job("b", instrument="LET")]
    per_instrument = Caps(max_running=None, per_instrument={"WISH": 1})
    assert caps_note(LABELS, caps=per_instrument, job=job("c"), running=running) == (
        "waiting for a slot: 1 WISH runs reducing (instrument cap 1)")
    overall = Caps(max_running=2, per_instrument={})
    assert caps_note(LABELS, caps=overall, job=job("c"), running=running) == (
        "waiting for a slot: 2 runs reducing (max_running 2)")


def test_metrics_gauges_are_replaced_not_accumulated() -> None:
    metrics = Metrics()
    metrics.set_runs(waiting={"WISH": 3, "": 1}, running={"LET": 1})
    metrics.set_runs(waiting={"LET": 2}, running={})
    get = metrics.registry.get_sample_value
    assert get("autoreduce_runs_waiting", {"instrument": "WISH"}) is None
    assert get("autoreduce_runs_waiting", {"instrument": "LET"}) == 2
    assert get("autoreduce_runs_running", {"instrument": "LET"}) is None


# -- the Grafana dashboard -----------------------------------------------------------------


def metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_dashboard_charts_every_metric_and_only_real_ones() -> None:
    dashboard = json.loads((CHART / "dashboards" / "autoreduce.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", m)
            for e in exprs for m in re.findall(r"autoreduce_[a-z_]+", e)}
    assert used == metric_names()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_config_map_renders_behind_its_value() -> None:
    helm = helm_binary()

    def render(*values: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [helm, "template", "ar", str(CHART), "-n", "reduction",
             *[a for v in values for a in ("-f", str(CHART / "ci" / v))]],
            capture_output=True, text=True, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    assert not [d for d in render("default-values.yaml")
                if d["metadata"]["name"].endswith("-dashboard")]
    (cm,) = [d for d in render("grafana-dashboard-values.yaml")
             if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "reduction"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "Autoreduction"
    shipped = json.loads((CHART / "dashboards" / "autoreduce.json").read_text())
    assert json.loads(cm["data"]["autoreduce.json"]) == shipped


def test_a_pending_pod_shows_the_cluster_autoscalers_latest_word() -> None:
    def said(reason: str, note: str, at: str) -> dict[str, object]:
        # As the autoscaler writes them (core/v1): no eventTime in the new API's view.
        return {"reason": reason, "note": note, "regarding": {"name": "red-x-1-v0-ab-p1"},
                "deprecatedLastTimestamp": at, "deprecatedSource": {"component":
                                                                    "cluster-autoscaler"}}

    notes = autoscaler_notes([
        said("NotTriggerScaleUp", "pod didn't trigger scale-up: 1 max node group size reached",
             "2026-01-01T00:00:05Z"),
        said("TriggeredScaleUp", "pod triggered scale-up: [{pool 1->2 (max: 3)}]",
             "2026-01-01T00:00:09Z"),
        said("Scheduled", "not the autoscaler's", "2026-01-01T00:00:10Z"),
    ])
    assert notes == {"red-x-1-v0-ab-p1": "TriggeredScaleUp: pod triggered scale-up: "
                                         "[{pool 1->2 (max: 3)}]"}
    job = {"metadata": {"name": "red-x-1-v0-ab", "labels": {}, "annotations": {}},
           "spec": {"suspend": False}, "status": {"startTime": "2026-01-01T00:00:01Z"}}
    pod = {"metadata": {"name": "red-x-1-v0-ab-p1"}, "status": {
        "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                            "reason": "Unschedulable",
                                            "message": "0/2 nodes are available"}]}}
    row = row_for(job, labels=Labels("autoreduce.io"), pods=[pod], holders={}, now=0.0,
                  autoscaler=notes)
    assert row.detail == ("red-x-1-v0-ab-p1 Pending (Unschedulable: 0/2 nodes are available; "
                          "cluster-autoscaler: TriggeredScaleUp: pod triggered scale-up: "
                          "[{pool 1->2 (max: 3)}])")

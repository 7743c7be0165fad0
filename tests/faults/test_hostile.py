"""Hostile and malformed input on the real stack (issue 9): fuzzed frames through the
broker into a running dispatcher, paths that escape the archive, names that try to
inject, a reduction script that tries to break out, and the broker password."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.messages import MessageError, parse_run
from autoreduce_common.stomp_client import BrokerError, StompClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from devstack.product import DispatcherProcess, Facility, run_message
from devstack.queues import QueueReader
from dispatcher.identity import job_name, run_key
from tests.faults.support import (
    FAST_SCRIPT,
    Collector,
    browse_count,
    list_jobs,
    record_fuzz,
)
from tests.harness.checks import count_outcomes, outcomes, send, stored_message
from tests.unit.test_chart_render import CHART, render

pytestmark = pytest.mark.integration

# -- fuzzing through the broker ------------------------------------------------------------

NASTY = ["", "\n", '"', "'", "{{ 7*7 }}", "{% if %}", "a: b\nkind: Pod", "\u202e", "😀", "ü",
         "../..", "\\\\isis\\inst$\\..\\..\\etc", "1" * 70, "-1", " 42 ", "0x10", "null", "\t"]
REQUIRED = {"data": "/isis/NDXWISH/x.nxs", "facility": "ISIS", "instrument": "WISH",
            "rb_number": "7700001", "run_number": 1, "reduction_script": FAST_SCRIPT,
            "reduction_arguments": {"standard_vars": {}, "advanced_vars": {}}}
json_leaf = (st.none() | st.booleans() | st.integers(-(10**13), 10**13) | st.floats(allow_nan=False)
             | st.text(max_size=30) | st.sampled_from(NASTY))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
header_value = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=40) | st.sampled_from(NASTY)
headers = st.dictionaries(
    st.sampled_from(["priority", "autoreduce-attempt", "x-fuzz", "JMSXGroupID", "x-ünï",
                     "reply-to-x", "autoreduce-reason"]),
    header_value, max_size=3)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    kind = draw(st.sampled_from(["bytes", "json", "message", "message", "message"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "json":
        body = json.dumps(draw(json_value)).encode()
    else:
        message: dict[str, Any] = dict(REQUIRED)
        message["run_number"] = draw(st.integers(1, 10**9))
        for name in draw(st.lists(st.sampled_from([*REQUIRED, "run_version", "cancel",
                                                   "description", "software"]),
                                  max_size=3, unique=True)):
            if draw(st.booleans()):
                message[name] = draw(json_value)
            else:
                message.pop(name, None)
        body = json.dumps(message, ensure_ascii=draw(st.booleans())).encode()
    header_map = draw(headers)
    header_map.pop("priority", None) if not header_map.get("priority", "").isdigit() else None
    return body, header_map


def fuzz_through_broker(*, cases: int, start_dispatcher: Callable[..., DispatcherProcess],
                        broker_settings: BrokerSettings, kube: Any, namespace: str) -> None:
    dispatcher = start_dispatcher(
        caps={"max_running": 1}, image_pull_grace_s=0,
        runner={"image": "registry.invalid/never-pulled:1"})  # Jobs are made, never run
    collector = Collector(broker_settings).start()
    client = StompClient(settings=broker_settings, client_name="fuzzer")
    client.connect()
    sent: list[tuple[bytes, dict[str, str]]] = []
    refused_by_broker = 0

    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(frames())
    def send_one(frame: tuple[bytes, dict[str, str]]) -> None:
        nonlocal refused_by_broker
        body, header_map = frame
        try:
            client.send(destination=broker_settings.queues.pending, body=body,
                        headers=header_map)
        except BrokerError:
            refused_by_broker += 1  # the broker's own ERROR: it never reached us
            client.ensure_connected()
            return
        sent.append(frame)

    try:
        send_one()
        dlq = broker_settings.queues.dead_letter
        expect_dead = [body for body, _ in sent if _refused(body)]
        collector.wait(lambda: len(collector.on("dead_letter")) >= len(expect_dead)
                       and browse_count(broker_settings, broker_settings.queues.pending) == 0,
                       timeout=120 + cases * 0.2, what="every fuzzed frame settled")
        time.sleep(2)
        assert dispatcher.alive(), dispatcher.log()[-3000:]
        dead = collector.on("dead_letter")
        reasons = [d.headers.get("autoreduce-reason", "") for d in dead]
        assert all(reasons), "a dead letter without a reason"
        dead_bodies = sorted(d.body for d in dead)
        assert dead_bodies == sorted(expect_dead), "dead-lettered set differs from refusals"
        names = {j["metadata"]["name"] for j in list_jobs(kube, namespace)}
        accepted = [body for body, _ in sent if not _refused(body)]
        for body in accepted:
            _, message = parse_run(body)
            if not message.cancel:
                assert job_name(run_key(message)) in names, body[:300]
        assert browse_count(broker_settings, broker_settings.queues.pending) == 0
        print(f"\nFUZZ FIGURES cases={cases} sent={len(sent)} broker_refused={refused_by_broker} "
              f"dead_lettered={len(dead)} jobs={len(names)} dlq={dlq}")
        record_fuzz(mode="long" if cases > 1000 else "short", cases=cases, sent=len(sent),
                    broker_refused=refused_by_broker, dead_lettered=len(dead), jobs=len(names),
                    dispatcher_alive=dispatcher.alive())
    finally:
        collector.stop()
        client.disconnect()


def _refused(body: bytes) -> bool:
    """What the dispatcher must dead-letter: the pure validation says no, or it is a
    cancellation without the run's identity. (Size limits are not fuzzed here.)"""
    try:
        _, message = parse_run(body)
    except MessageError:
        return True
    return bool(message.cancel and not (message.instrument and message.rb_number))


def test_fuzzed_frames_are_dead_lettered_or_become_jobs(
    start_dispatcher: Callable[..., DispatcherProcess], broker_settings: BrokerSettings,
    kube: Any, namespace: str,
) -> None:
    fuzz_through_broker(cases=300, start_dispatcher=start_dispatcher,
                        broker_settings=broker_settings, kube=kube, namespace=namespace)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzzed_frames_are_dead_lettered_or_become_jobs_long(
    start_dispatcher: Callable[..., DispatcherProcess], broker_settings: BrokerSettings,
    kube: Any, namespace: str,
) -> None:
    fuzz_through_broker(cases=10_000, start_dispatcher=start_dispatcher,
                        broker_settings=broker_settings, kube=kube, namespace=namespace)


# -- paths -------------------------------------------------------------------------------------

READER_SCRIPT = "def main(input_file, output_dir):\n    print(open(input_file).read())\n"


def test_paths_out_of_the_archive_and_output_roots_are_refused_end_to_end(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
) -> None:
    """dispatcher -> Job -> runner pod, with the archive mounted read-only at /isis."""
    start_dispatcher()
    secret = facility.root / "secret.nxs"
    secret.write_text("TOP SECRET")
    secret.chmod(0o644)
    good = facility.data_file("WISH", 1)
    link = facility.archive / "NDXWISH/Instrument/data/cycle_23_4/link.nxs"
    link.symlink_to(secret)
    up = "/..".join([""] * 8)  # enough '..' to reach / from /isis/NDXWISH
    cases = {
        1: str(secret),  # outside the archive roots
        2: f"/isis/NDXWISH{up}{secret}",  # '..' segments
        3: "/isis/NDXWISH/Instrument/data/cycle_23_4/link.nxs",  # symlink out
        4: "\\\\isis\\inst$\\NDXWISH" + up.replace("/", "\\") + str(secret).replace("/", "\\"),
        5: "\\\\otherhost\\share\\secret.nxs",  # UNC with no mapping
    }
    for run, data in cases.items():
        send(stomp, broker_settings, run_message(
            facility=facility, instrument="WISH", rb=8800000 + run, run=run,
            script=READER_SCRIPT, data=data))
    # A script returning an output directory outside the output roots.
    escape = facility.root / "escaped"
    send(stomp, broker_settings, run_message(
        facility=facility, instrument="WISH", rb=8800009, run=9, data=good,
        script="def main(input_file, output_dir):\n"
               "    open(output_dir + '/out.txt', 'w').write('x')\n"
               f"    return {str(escape)!r}\n"))
    reader.wait_for(count_outcomes(broker_settings, 6), timeout=180)
    errors = {m["run_number"]: m for m in outcomes(reader, broker_settings, "error")}
    assert sorted(errors) == [1, 2, 3, 4, 5, 9], outcomes(reader, broker_settings, "complete")
    for run in cases:
        assert errors[run]["message"].startswith("Refused: data path"), errors[run]["message"]
        assert "TOP SECRET" not in json.dumps(errors[run])
    assert "outside the allowed roots" in errors[9]["message"], errors[9]["message"]
    assert not escape.exists()


# -- names -------------------------------------------------------------------------------------


def test_hostile_names_are_refused_and_odd_values_travel_as_plain_values(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str,
) -> None:
    start_dispatcher()
    injections = [
        {"rb_number": "8900001\nkind: Pod"}, {"rb_number": '89"00'},
        {"rb_number": "{{ job.name }}"}, {"rb_number": "8" * 64},
        {"instrument": "WISH\n  labels: {}"}, {"instrument": "WI{{SH}}"},
        {"instrument": "W" * 80}, {"instrument": "WÏSH"},
        {"run_number": "12\n34"}, {"run_number": "١٢"}, {"run_number": -5},
        {"run_number": 10**15}, {"facility": "IS IS"},
    ]
    base = run_message(facility=facility, instrument="WISH", rb=8900000, run=1, script=FAST_SCRIPT)
    for change in injections:
        send(stomp, broker_settings, {**base, **change})
    odd = "{{ job.name }}\n---\nkind: Pod\n\"quoted\" 'single' \u202e 😀 ${HOME} $(HOME)"
    plain = {**run_message(facility=facility, instrument="wish_2-x", rb=" 8900002 ", run=42,
                           script=FAST_SCRIPT, description=odd,
                           reduction_arguments={"standard_vars": {odd: odd},
                                                "advanced_vars": {}},
                           **{"x-unknown {{": [odd]}),
             "run_number": "000042"}
    send(stomp, broker_settings, plain)
    dlq = broker_settings.queues.dead_letter
    reader.wait_for(lambda seen: sum(d.destination == dlq for d in seen) >= len(injections)
                    and bool(outcomes(reader, broker_settings, "complete")), timeout=120)
    dead = [d for d in reader.seen if d.destination == dlq]
    for delivery in dead:
        reason = delivery.headers["autoreduce-reason"]
        assert "\n" not in reason and any(
            f in reason for f in ("rb_number", "instrument", "run_number", "facility")), reason
    (complete,) = outcomes(reader, broker_settings, "complete")
    # The outcome echoes the message exactly: nothing rendered, nothing lost.
    for key in ("description", "reduction_arguments", "x-unknown {{", "rb_number", "run_number",
                "instrument"):
        assert complete[key] == plain[key], key
    jobs = list_jobs(kube, namespace)
    assert len(jobs) == 1
    labels = jobs[0]["metadata"]["labels"]
    assert labels["autoreduce.io/rb-number"] == "8900002"
    assert labels["autoreduce.io/instrument"] == "WISH_2-X"
    assert labels["autoreduce.io/run-number"] == "42"
    with kube.api_client() as api:
        assert stored_message(api, namespace, jobs[0]["metadata"]["name"]) == plain


# -- an untrusted script on the real stack --------------------------------------------------

BREAKOUT_SCRIPT = r'''
import json, os
def attempt(what, fn):
    try:
        fn()
        return what + ": ALLOWED"
    except Exception as error:
        return what + ": refused (" + type(error).__name__ + ")"
def write(path):
    def go():
        with open(path, "w") as f:
            f.write("pwned")
    return go
def main(input_file, output_dir):
    report = {
        "uid": os.getuid(),
        "token": attempt("token", lambda: open(
            "/var/run/secrets/kubernetes.io/serviceaccount/token").read()),
        "archive": attempt("archive", write(os.path.join(os.path.dirname(input_file),
                                                         "pwned.txt"))),
        "root": attempt("root", write("/pwned.txt")),
        "etc": attempt("etc", write("/etc/pwned.txt")),
        "usr": attempt("usr", write("/usr/pwned.txt")),
        "var": attempt("var", write("/var/tmp/pwned.txt")),
        "env": sorted(k for k in os.environ if "BROKER" in k or "PASSWORD" in k),
        "sa_env": sorted(k for k in os.environ if k.startswith("KUBERNETES_SERVICE")),
    }
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f)
    print("REPORT " + json.dumps(report))
'''


def test_a_script_cannot_read_a_token_write_the_archive_or_the_root_filesystem(
    start_dispatcher: Callable[..., DispatcherProcess], stomp: StompClient, broker: Any,
    broker_settings: BrokerSettings, reader: QueueReader, facility: Facility,
    kube: Any, namespace: str, runner_uid: int | None,
) -> None:
    # Non-root runner pods are part of what is tested: never skip, fail with the reason.
    assert runner_uid is not None, (
        "runner pods cannot run as non-root here: uid 1000 cannot run the project's venv "
        "(create it with Debian's /usr/bin/python3, as scripts/bootstrap.sh does)"
    )
    proc = start_dispatcher()
    message = run_message(facility=facility, instrument="WISH", rb=9100001, run=5,
                          script=BREAKOUT_SCRIPT)
    send(stomp, broker_settings, message)
    # And one run that fails and one message that is dead-lettered, for the log scan.
    send(stomp, broker_settings, run_message(
        facility=facility, instrument="WISH", rb=9100002, run=6,
        script="def main(input_file, output_dir):\n    raise RuntimeError('boom')\n"))
    send(stomp, broker_settings, {**message, "rb_number": "bad rb"})
    reader.wait_for(count_outcomes(broker_settings, 3), timeout=120)
    (complete,) = outcomes(reader, broker_settings, "complete")
    report = json.loads(complete["reduction_log"].split("REPORT ", 1)[1].splitlines()[0])
    assert report["uid"] == runner_uid != 0
    for what in ("token", "archive", "root", "etc", "usr", "var"):
        assert report[what].startswith(f"{what}: refused"), report
    assert report["env"] == [], report
    assert not list(facility.archive.rglob("pwned.txt"))
    jobs = list_jobs(kube, namespace)
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert all(m["readOnly"] for m in container["volumeMounts"] if m["mountPath"] == "/isis")
    _assert_password_nowhere(kube, namespace, broker, proc, reader)


def _assert_password_nowhere(kube: Any, namespace: str, broker: Any,
                             proc: DispatcherProcess, reader: QueueReader) -> None:
    """The broker passwords (the dispatcher's and the runners'): only a Secret reference
    in Jobs; never in logs or messages."""
    passwords = {broker.dispatcher.password, broker.runner.password}
    assert all(len(password) >= 6 for password in passwords)
    places: dict[str, str] = {"dispatcher log": proc.log()}
    for kind in ("jobs", "configmaps", "pods", "events"):
        places[kind] = kube.kubectl("get", kind, "-n", namespace, "-o", "json", check=True).stdout
    pods = json.loads(places["pods"])["items"]
    assert pods
    for pod in pods:
        name = pod["metadata"]["name"]
        places[f"log of {name}"] = kube.kubectl("logs", "-n", namespace, name).stdout
    places["outcome messages"] = "\n".join(d.body.decode(errors="replace") for d in reader.seen)
    leaks = [where for where, text in places.items() if any(p in text for p in passwords)]
    assert not leaks, f"the broker password appears in: {leaks}"
    for job in json.loads(places["jobs"])["items"]:
        volumes = job["spec"]["template"]["spec"]["volumes"]
        secrets = [v["secret"] for v in volumes if "secret" in v]
        assert [(s["secretName"], s["items"]) for s in secrets] == [
            ("autoreduce-broker", [{"key": "password", "path": "password"}])]
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert not [e for e in env if "PASSWORD" in e["name"] and "value" in e
                    and not e["value"].startswith("/")], env


# -- the chart's NetworkPolicy ---------------------------------------------------------------


def test_runner_egress_is_limited_to_the_broker_and_dns() -> None:
    docs = render(CHART / "ci" / "network-policy-values.yaml")
    (runner,) = [d for d in docs if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"].endswith("-runner")]
    spec = runner["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and spec["ingress"] == []
    values = yaml.safe_load((CHART / "ci" / "network-policy-values.yaml").read_text())
    broker_ports = {int(h.rsplit(":", 1)[1]) for h in values["broker"]["hosts"]}
    for rule in spec["egress"]:
        ports = {p["port"] for p in rule.get("ports") or []}
        assert ports, f"an egress rule open on every port: {rule}"
        assert ports <= broker_ports | {53}, rule
        if ports & broker_ports:
            assert rule.get("to"), "broker egress must name the broker's peers"
    # Nothing but the runner pods is selected, and they get no ingress at all.
    assert spec["podSelector"]["matchLabels"] == {"autoreduce.io/managed": "true"}




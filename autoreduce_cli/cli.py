"""``autoreduce``: the operator's command line.

    autoreduce status [--watch [SECONDS]]       runs waiting, running, recently finished
    autoreduce submit DATA SCRIPT --rb N        a manual run (priority 1, started_by -1)
    autoreduce cancel --instrument I --rb N --run R [--version V]
    autoreduce retry JOB | --instrument I --run R --version V    (alias: rerun)
    autoreduce render MESSAGE.json [--dry-run-server]
    autoreduce dead-letters list | show ID | requeue ID...

It reads the dispatcher's own settings (``--config`` / ``AUTOREDUCE_CONFIG_FILE``
and ``AUTOREDUCE_*`` variables) for the namespace, label prefix, queues and broker,
and ``--kubeconfig`` / ``KUBECONFIG`` (else ``~/.kube/config``, else in-cluster) for
the API. Every command prints a human view, or JSON with ``-o json``. Its API rights
are the chart's operator Role (values ``operatorRole.*``): get and list Jobs, list
Pods, get ConfigMaps, get and list Leases; ``render --dry-run-server`` also needs
create on Jobs (``operatorRole.serverDryRun``).

Exit codes: 0 done (a followed run ended Complete or Skipped), 1 the followed run
ended in error, 2 bad usage or settings, 3 broker unreachable, 4 API error,
5 timed out waiting, 6 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from autoreduce_common.messages import MessageError, encode, parse_run, rerun
from autoreduce_common.stomp_client import BrokerError, Delivery, StompClient

from autoreduce_cli import status as view
from dispatcher.config import DispatcherSettings, load_settings
from dispatcher.identity import Labels, RunKey, job_name, lease_name, run_key
from dispatcher.kube import Kube, KubeError
from dispatcher.manifests import Arrival, TemplateError, load_template, message_of, render_job

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_API, EXIT_TIMEOUT, EXIT_NOT_FOUND = range(7)
MANUAL_PRIORITY = 1  # legacy manual submission
RERUN_PRIORITY = 0  # reruns and retries
CANCEL_PRIORITY = 9  # a cancel should not queue behind the burst it cancels
BROWSE_TIMEOUT_S = 10.0
# Seconds after the Job finished before we stop looking for its outcome message.
CONSUMED_GRACE_S = 15.0


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Context:
    """What every command gets: settings, output mode and lazily made clients."""

    settings: DispatcherSettings
    labels: Labels
    output: str
    kubeconfig: Path | None
    namespace: str
    _kube: Kube | None = None
    _broker: StompClient | None = None

    @property
    def json(self) -> bool:
        return self.output == "json"

    def kube(self) -> Kube:
        if self._kube is None:
            try:
                self._kube = Kube.connect(
                    kubeconfig=self.kubeconfig,
                    namespace=self.namespace,
                    qps=self.settings.api_qps,
                    burst=self.settings.api_burst,
                )
            except Exception as error:  # the client's ConfigException and file errors
                raise CliError(f"no Kubernetes credentials: {error}", EXIT_USAGE) from error
        return self._kube

    def broker(self) -> StompClient:
        if self._broker is None:
            client = StompClient(settings=self.settings.broker, client_name="autoreduce-cli")
            client.connect()
            self._broker = client
        return self._broker

    def close(self) -> None:
        if self._broker is not None:
            self._broker.disconnect()

    def emit(self, human: str, machine: Any) -> None:
        if self.json:
            print(json.dumps(machine, indent=2, sort_keys=True, default=str), flush=True)
        else:
            print(human, end="" if human.endswith("\n") else "\n", flush=True)

    def progress(self, text: str) -> None:
        """Progress lines: stdout for people, stderr under -o json (stdout stays JSON)."""
        print(text, file=sys.stderr if self.json else sys.stdout, flush=True)


# -- the broker ----------------------------------------------------------------------


def browse(client: StompClient, destination: str, *, selector: str | None = None) -> list[Delivery]:
    """Every message on a queue, left where it is (ActiveMQ queue browser)."""
    sink: queue.Queue[Delivery] = queue.Queue()
    headers = {"browser": "true"}
    if selector:
        headers["selector"] = selector
    client.subscribe(destination=destination, sink=sink, prefetch=500, headers=headers)
    found: list[Delivery] = []
    try:
        while True:
            try:
                delivery = sink.get(timeout=BROWSE_TIMEOUT_S)
            except queue.Empty as error:
                raise BrokerError(
                    f"browsing {destination}: no end-of-browse from the broker"
                ) from error
            if delivery.headers.get("browser") == "end":
                return found
            found.append(delivery)
    finally:
        client.unsubscribe(sink)


def take(client: StompClient, destination: str, message_id: str) -> Delivery | None:
    """Receive (unacked) the one message with this id, or None if it is not there."""
    sink: queue.Queue[Delivery] = queue.Queue()
    quoted = message_id.replace("'", "''")
    client.subscribe(
        destination=destination,
        sink=sink,
        prefetch=1,
        headers={"selector": f"JMSMessageID = '{quoted}'"},
    )
    try:
        return sink.get(timeout=3.0)
    except queue.Empty:
        client.unsubscribe(sink)
        return None


# -- status ---------------------------------------------------------------------------


def _status(ctx: Context, args: argparse.Namespace) -> view.Status:
    kube = ctx.kube()
    selector = f"{ctx.labels.managed}=true"
    jobs, _ = kube.list_jobs(selector=selector)
    return view.summarize(
        jobs=jobs,
        pods=kube.list_pods(selector=selector),
        leases=kube.list_leases(selector=selector),
        labels=ctx.labels,
        now=time.time(),
        recent=args.recent,
        instrument=args.instrument,
        rb=args.rb,
    )


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    shown = 0
    while True:
        current = _status(ctx, args)
        header = f"namespace {ctx.namespace} at {time.strftime('%H:%M:%S')}\n"
        if ctx.json:
            payload = {"namespace": ctx.namespace, "time": time.time(), **view.status_json(current)}
            # --watch under -o json: one JSON document per line, a stream.
            text = json.dumps(payload, default=str)
            print(text if args.watch is not None else json.dumps(payload, indent=2), flush=True)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(header + view.format_status(current), flush=True)
        shown += 1
        if args.watch is None or (args.count and shown >= args.count):
            return EXIT_OK
        time.sleep(args.watch)


# -- following a run ------------------------------------------------------------------


FINAL = ("complete", "error", "skipped")


def _outcomes(ctx: Context, key: RunKey) -> dict[str, dict[str, Any]]:
    """Outcome messages of this run still on the outcome queues (browsed, not consumed)."""
    queues = ctx.settings.broker.queues
    found: dict[str, dict[str, Any]] = {}
    for name in ("started", *FINAL):
        for delivery in browse(ctx.broker(), getattr(queues, name)):
            try:
                body = json.loads(delivery.body)
            except ValueError:
                continue
            if isinstance(body, dict) and view.matches_run(
                body, instrument=key.instrument, run=key.first_run, version=key.version
            ):
                found[name] = body
    return found


def _job_state(ctx: Context, name: str) -> tuple[str, str]:
    job = ctx.kube().get_job(name)
    if job is None:
        return "absent", ""
    row = view.row_for(job, labels=ctx.labels, pods=[], holders={}, now=time.time())
    if row.state == view.WAITING:
        lease = ctx.kube().get_lease(lease_name(row.rb))
        holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
        why = f"RB {row.rb} held by {holder}" if holder and holder != name else "for a slot"
        return "waiting", why
    return row.state, row.outcome


def follow(ctx: Context, key: RunKey, *, timeout: float) -> dict[str, Any]:
    """Show the run's progress until its outcome is on an outcome queue."""
    name = job_name(key)
    started = time.monotonic()
    last: tuple[str, str] | None = None
    announced_start = False
    finished_at: float | None = None
    while True:
        elapsed = time.monotonic() - started
        state = _job_state(ctx, name)
        if state != last:
            where = f" ({state[1]})" if state[1] else ""
            ctx.progress(f"[{elapsed:6.1f}s] Job {name}: {state[0]}{where}")
            last = state
        if state[0] == view.FINISHED and finished_at is None:
            finished_at = elapsed
        found = _outcomes(ctx, key)
        if "started" in found and not announced_start:
            ctx.progress(f"[{elapsed:6.1f}s] ReductionStarted")
            announced_start = True
        final = next((kind for kind in FINAL if kind in found), None)
        if final is not None:
            body = found[final]
            detail = body.get("message") or ", ".join(body.get("reduction_data") or [])
            ctx.progress(f"[{elapsed:6.1f}s] Reduction{final.capitalize()}: {detail}")
            return {
                "job": name,
                "outcome": final.capitalize(),
                "message": body.get("message"),
                "reduction_data": body.get("reduction_data"),
                "seconds": round(elapsed, 1),
            }
        if finished_at is not None and elapsed - finished_at > CONSUMED_GRACE_S:
            # A consumer (the web app) took the outcome before we could browse it:
            # say what the Job and the runner's termination message tell.
            return _from_job(ctx, name, elapsed)
        if elapsed > timeout:
            raise CliError(f"no outcome for {key.describe()} after {timeout:.0f}s", EXIT_TIMEOUT)
        time.sleep(1.0)


def _from_job(ctx: Context, name: str, elapsed: float) -> dict[str, Any]:
    job = ctx.kube().get_job(name) or {}
    pods = ctx.kube().list_pods(selector=f"batch.kubernetes.io/job-name={name}")
    row = view.row_for(job, labels=ctx.labels, pods=pods, holders={}, now=time.time())
    outcome = "Error" if row.outcome in ("Failed", "Cancelled") else row.outcome
    ctx.progress(
        f"[{elapsed:6.1f}s] {row.outcome} (from the Job; the outcome message was consumed)"
    )
    return {
        "job": name,
        "outcome": outcome,
        "message": row.detail or None,
        "reduction_data": None,
        "seconds": round(elapsed, 1),
        "source": "job",
    }


def _send_run(ctx: Context, message: dict[str, Any], *, priority: int) -> RunKey:
    try:
        _, parsed = parse_run(encode(message))
    except MessageError as error:
        raise CliError(f"the run would be refused: {error.reason}", EXIT_USAGE) from error
    ctx.broker().send(
        destination=ctx.settings.broker.queues.pending, body=encode(message), priority=priority
    )
    return run_key(parsed)


def _finish_send(ctx: Context, args: argparse.Namespace, key: RunKey, what: str) -> int:
    sent = {"sent": what, "run": key.describe(), "job": job_name(key)}
    if not args.wait:
        ctx.emit(f"{what}: {key.describe()} -> Job {job_name(key)}", sent)
        return EXIT_OK
    ctx.progress(f"{what}: {key.describe()}; following Job {job_name(key)} (Ctrl-C stops watching)")
    result = {**sent, **follow(ctx, key, timeout=args.timeout)}
    ctx.emit(f"{result['outcome']}: {key.describe()}", result)
    return EXIT_RUN_FAILED if result["outcome"] == "Error" else EXIT_OK


# -- submit, cancel, retry ------------------------------------------------------------


def cmd_submit(ctx: Context, args: argparse.Namespace) -> int:
    guessed_instrument, guessed_run = view.run_from_filename(args.data)
    instrument = args.instrument or guessed_instrument
    run = args.run if args.run is not None else guessed_run
    if not instrument or run is None:
        raise CliError("cannot tell instrument and run from the file name: pass them", EXIT_USAGE)
    try:
        script = Path(args.script).read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read the script: {error}", EXIT_USAGE) from error
    message: dict[str, Any] = {
        "data": args.data,
        "facility": args.facility,
        "instrument": instrument.upper(),
        "rb_number": args.rb,
        "run_number": run,
        "run_version": args.version,
        "reduction_script": script,
        "reduction_arguments": _arguments(args.arguments),
        "started_by": -1,  # legacy: manual submission
    }
    if args.description:
        message["description"] = args.description
    key = _send_run(ctx, message, priority=MANUAL_PRIORITY)
    return _finish_send(ctx, args, key, "submitted")


def _arguments(text: str | None) -> dict[str, Any]:
    if not text:
        return {"standard_vars": {}, "advanced_vars": {}}
    source = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
    try:
        loaded = json.loads(source)
    except ValueError as error:
        raise CliError(f"--arguments is not JSON: {error}", EXIT_USAGE) from error
    if not isinstance(loaded, dict):
        raise CliError("--arguments must be a JSON object", EXIT_USAGE)
    loaded.setdefault("standard_vars", {})
    loaded.setdefault("advanced_vars", {})
    return loaded


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    message = {
        "cancel": True,
        "facility": args.facility,
        "instrument": args.instrument.upper(),
        "rb_number": args.rb,
        "run_number": args.run,
        "run_version": args.version,
    }
    ctx.broker().send(
        destination=ctx.settings.broker.queues.pending,
        body=encode(message),
        priority=CANCEL_PRIORITY,
    )
    describe = f"{args.instrument.upper()} run {args.run} v{args.version} (RB {args.rb})"
    ctx.emit(f"cancel sent for {describe}", {"cancel": True, **message, "run": describe})
    return EXIT_OK


def _key_of_job(ctx: Context, args: argparse.Namespace) -> str:
    if args.job:
        return str(args.job)
    if not (args.instrument and args.run is not None):
        raise CliError("name the Job, or give --instrument, --run and --version", EXIT_USAGE)
    key = RunKey(
        facility=args.facility,
        instrument=args.instrument.upper(),
        runs=(args.run,),
        version=args.version,
        rb_number="",
    )
    return job_name(key)


def _next_version(ctx: Context, raw: dict[str, Any]) -> int:
    """One past the highest version of this run the cluster still knows (at least v+1)."""
    current = int(raw.get("run_version") or 0)
    runs = raw.get("run_number")
    first = min(runs) if isinstance(runs, list) else runs
    selector = ctx.labels.selector(
        instrument=str(raw.get("instrument", "")).upper(), run_number=str(int(str(first)))
    )
    jobs, _ = ctx.kube().list_jobs(selector=selector)
    versions = [current]
    for job in jobs:
        tags = (job.get("metadata") or {}).get("labels") or {}
        try:
            versions.append(int(tags.get(ctx.labels.key("run-version"), "0")))
        except ValueError:
            continue
    return max(versions) + 1


def cmd_retry(ctx: Context, args: argparse.Namespace) -> int:
    name = _key_of_job(ctx, args)
    config_map = ctx.kube().get_config_map(name)
    if config_map is None:
        raise CliError(
            f"no message stored for Job {name} (ConfigMap gone with its Job?)", EXIT_NOT_FOUND
        )
    raw = message_of(config_map)
    if raw is None:
        raise CliError(f"ConfigMap {name} holds no JSON message", EXIT_NOT_FOUND)
    version = _next_version(ctx, raw)
    message = rerun(raw, version=version, description=args.description)
    key = _send_run(ctx, message, priority=RERUN_PRIORITY)
    return _finish_send(ctx, args, key, f"resubmitted {name} as version {version}")


# -- render ---------------------------------------------------------------------------


def cmd_render(ctx: Context, args: argparse.Namespace) -> int:
    try:
        _, message = parse_run(Path(args.message).read_bytes())
        template = load_template(ctx.settings.jobs.template_path)
    except OSError as error:
        raise CliError(f"cannot read: {error}", EXIT_USAGE) from error
    except MessageError as error:
        raise CliError(
            f"the dispatcher would dead-letter this message: {error.reason}", EXIT_USAGE
        ) from error
    except TemplateError as error:
        raise CliError(str(error), EXIT_USAGE) from error
    if message.cancel:
        raise CliError("a cancel message makes no Job", EXIT_USAGE)
    job = render_job(
        settings=ctx.settings,
        template=template,
        key=run_key(message),
        arrival=Arrival(priority=args.priority, enqueued_ms=int(time.time() * 1000), message_id=""),
    )
    if args.dry_run_server:
        ctx.kube().dry_run_job(job)  # KubeError (Invalid: what is wrong) -> exit 4
        print(
            f"server-side dry run: the API accepts Job {job['metadata']['name']}", file=sys.stderr
        )
    ctx.emit(yaml.safe_dump(job, sort_keys=False), job)
    return EXIT_OK


# -- dead letters ----------------------------------------------------------------------


def _letters(ctx: Context) -> list[view.DeadLetter]:
    return [
        view.dead_letter(d.headers, d.body)
        for d in browse(ctx.broker(), ctx.settings.broker.queues.dead_letter)
    ]


def cmd_dlq_list(ctx: Context, args: argparse.Namespace) -> int:
    letters = _letters(ctx)
    machine = [
        {k: v for k, v in asdict(d).items() if k not in {"body", "headers"}} for d in letters
    ]
    ctx.emit(view.format_dead_letters(letters, now=time.time()), machine)
    return EXIT_OK


def cmd_dlq_show(ctx: Context, args: argparse.Namespace) -> int:
    letter = next((d for d in _letters(ctx) if d.message_id == args.id), None)
    if letter is None:
        raise CliError(f"no message {args.id} on the dead-letter queue", EXIT_NOT_FOUND)
    ctx.emit(view.format_dead_letter(letter), asdict(letter))
    return EXIT_OK


def cmd_dlq_requeue(ctx: Context, args: argparse.Namespace) -> int:
    queues = ctx.settings.broker.queues
    ids = [d.message_id for d in _letters(ctx)] if args.all else list(args.ids)
    if not ids:
        raise CliError("name message ids, or pass --all", EXIT_USAGE)
    moved, missing = [], []
    for message_id in ids:
        delivery = take(ctx.broker(), queues.dead_letter, message_id)
        if delivery is None:
            missing.append(message_id)
            continue
        try:
            priority = int(delivery.headers.get("original-priority", "4"))
        except ValueError:
            priority = 4
        # Send first, then ack: a crash in between leaves a duplicate, which the
        # dispatcher's idempotent Job names absorb; the reverse could lose the run.
        ctx.broker().send(destination=queues.pending, body=delivery.body, priority=priority)
        ctx.broker().ack(delivery)
        moved.append(message_id)
    human = "".join(f"requeued {m} to {queues.pending}\n" for m in moved)
    human += "".join(f"not on the dead-letter queue: {m}\n" for m in missing)
    ctx.emit(human or "nothing requeued\n", {"requeued": moved, "missing": missing})
    return EXIT_OK if not missing else EXIT_NOT_FOUND


# -- arguments ---------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("AUTOREDUCE_CONFIG_FILE"),
        help="the dispatcher's settings file (AUTOREDUCE_* variables override it)",
    )
    common.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    common.add_argument("-n", "--namespace", help="namespace (default: settings jobs.namespace)")
    common.add_argument("-o", "--output", choices=("text", "json"), default="text")
    return common


def _run_id(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--instrument", required=required)
    parser.add_argument("--run", type=int, required=required)
    parser.add_argument("--version", type=int, default=0)
    parser.add_argument("--facility", default="ISIS")


def _follow_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait", dest="wait", action="store_false", help="send and return at once"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the run")


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(
        prog="autoreduce",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", parents=[common], help="runs waiting, running, recently finished")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS")
    p.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes")
    p.add_argument("--recent", type=int, default=10, help="finished runs shown")
    p.add_argument("--instrument")
    p.add_argument("--rb")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", parents=[common], help="submit a run by hand (priority 1)")
    p.add_argument("data", help="raw data file path as the reduction pods see it")
    p.add_argument("script", help="local path of the reduce.py to send")
    p.add_argument("--rb", required=True, help="RB (experiment) number")
    p.add_argument("--instrument", help="default: from the data file name")
    p.add_argument("--run", type=int, help="default: from the data file name")
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--facility", default="ISIS")
    p.add_argument("--arguments", help="reduction_arguments as JSON, or @file")
    p.add_argument("--description")
    _follow_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("cancel", parents=[common], help="cancel a waiting or running run")
    _run_id(p, required=True)
    p.add_argument("--rb", required=True)
    p.set_defaults(func=cmd_cancel)

    for name in ("retry", "rerun"):
        p = sub.add_parser(name, parents=[common], help="resubmit a run as the next version")
        p.add_argument("job", nargs="?", help="the Job name (or give --instrument/--run/--version)")
        _run_id(p, required=False)
        p.add_argument("--description")
        _follow_args(p)
        p.set_defaults(func=cmd_retry)

    p = sub.add_parser("render", parents=[common], help="print the Job a message would make")
    p.add_argument("message", help="a run message (JSON file)")
    p.add_argument("--priority", type=int, default=4)
    p.add_argument("--dry-run-server", action="store_true", help="validate it with the API")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("dead-letters", help="the dead-letter queue")
    dlq = p.add_subparsers(dest="action", required=True)
    q = dlq.add_parser("list", parents=[common], help="browse (nothing is consumed)")
    q.set_defaults(func=cmd_dlq_list)
    q = dlq.add_parser("show", parents=[common], help="one message: reason, headers, body")
    q.add_argument("id")
    q.set_defaults(func=cmd_dlq_show)
    q = dlq.add_parser("requeue", parents=[common], help="move messages back to pending")
    q.add_argument("ids", nargs="*")
    q.add_argument("--all", action="store_true")
    q.set_defaults(func=cmd_dlq_requeue)
    return top


def _kubeconfig(given: Path | None) -> Path | None:
    if given is not None:
        return given
    default = Path.home() / ".kube" / "config"
    return default if default.exists() else None


def build_context(args: argparse.Namespace) -> Context:
    try:
        settings = load_settings(config_file=args.config)
    except (OSError, ValueError) as error:
        raise CliError(f"bad settings: {error}", EXIT_USAGE) from error
    return Context(
        settings=settings,
        labels=Labels(settings.jobs.label_prefix),
        output=args.output,
        kubeconfig=_kubeconfig(args.kubeconfig),
        namespace=args.namespace or settings.jobs.namespace,
    )


@contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except BrokerError as error:
        raise CliError(f"broker: {error}", EXIT_BROKER) from error
    except KubeError as error:
        raise CliError(f"Kubernetes API: {error}", EXIT_API) from error


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func: Callable[[Context, argparse.Namespace], int] = args.func
    ctx: Context | None = None
    try:
        ctx = build_context(args)
        with _mapped_errors():
            return func(ctx, args)
    except CliError as error:
        print(f"autoreduce: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())

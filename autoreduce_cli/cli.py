"""The ``autoreduce`` entry point, and what every command gets: settings and clients.

It reads the dispatcher's own settings (``--config`` / ``AUTOREDUCE_CONFIG_FILE``
and ``AUTOREDUCE_*`` variables) for the namespace, label prefix, queues and broker,
and ``--kubeconfig`` / ``KUBECONFIG`` (else ``~/.kube/config``, else in-cluster) for
the API. Every command prints a human view, or JSON with ``-o json``. The commands
are in ``args``, the exit codes in ``errors``.

Every API call the CLI makes is a method of ``Context`` below, so its API rights,
the chart's operator Role (values ``operatorRole.*``), follow from this one module
(tests/unit/test_chart_render.py checks them against it): get and list Jobs, list
Pods, get ConfigMaps, get and list Leases, list Events; ``render --dry-run-server`` also needs
create on Jobs (``operatorRole.serverDryRun``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoreduce_common.stomp_client import StompClient

from autoreduce_cli.args import parser
from autoreduce_cli.cmd_dead_letters import cmd_dlq_requeue
from autoreduce_cli.cmd_retry import cmd_retry
from autoreduce_cli.cmd_submit import _arguments, cmd_submit
from autoreduce_cli.errors import EXIT_USAGE, CliError, mapped_errors
from autoreduce_cli.queues import browse
from dispatcher.config import DispatcherSettings, load_settings
from dispatcher.identity import Labels
from dispatcher.kube import Forbidden, Kube, Obj

# _arguments, browse and the cmd_* functions live in their own modules; they are
# named here because tests read them from this one: tests/unit/test_cli_status.py
# (``cli.<name>``) and tests/integration/test_chart.py (``browse``).
__all__ = [
    "EXIT_USAGE",
    "CliError",
    "Context",
    "_arguments",
    "browse",
    "build_context",
    "cmd_dlq_requeue",
    "cmd_retry",
    "cmd_submit",
    "main",
    "parser",
]


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
    _events_refused: bool = False

    @property
    def json(self) -> bool:
        return self.output == "json"

    def _api(self) -> Kube:
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

    # -- the API calls, each with the operator Role's right it needs --------------

    def jobs(self, *, selector: str) -> list[Obj]:
        """list Jobs: status; retry's next version."""
        jobs, _ = self._api().list_jobs(selector=selector)
        return jobs

    def job(self, name: str) -> Obj | None:
        """get Jobs: following a run (and the canary's); retry reads the run's message."""
        return self._api().get_job(name)

    def pods(self, *, selector: str) -> list[Obj]:
        """list Pods: status; a followed run (or the canary) told from its pods."""
        return self._api().list_pods(selector=selector)

    def config_map(self, name: str) -> Obj | None:
        """get ConfigMaps: retry reads the message of a Job too large to carry it."""
        return self._api().get_config_map(name)

    def lease(self, name: str) -> Obj | None:
        """get Leases: a followed run that waits."""
        return self._api().get_lease(name)

    def leases(self, *, selector: str) -> list[Obj]:
        """list Leases: status shows the RB holders."""
        return self._api().list_leases(selector=selector)

    def events(self, *, regarding: str | None = None, reason: str | None = None) -> list[Obj]:
        """list Events: explain tells a run's story from its Jobs' and pods' Events;
        status reads the cluster autoscaler's verdicts on pending pods by reason.

        Events are commentary: a Role without this right (an operator Role bound
        before the CLI read Events) gets the rest of the answer, and one warning."""
        try:
            return self._api().list_events(regarding=regarding, reason=reason)
        except Forbidden as error:
            if not self._events_refused:
                self._events_refused = True
                print(f"autoreduce: no Events shown: {error} (the chart's operator Role "
                      "grants list on events.k8s.io Events)", file=sys.stderr)
            return []

    def dry_run_job(self, job: Obj) -> None:
        """create Jobs, server-side dry run only (operatorRole.serverDryRun)."""
        self._api().dry_run_job(job)


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func: Callable[[Context, argparse.Namespace], int] = args.func
    ctx: Context | None = None
    try:
        ctx = build_context(args)
        with mapped_errors():
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

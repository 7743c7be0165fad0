"""``python -m bench [--quick]``: start the real stack, run every scenario, write results."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import machine, report
from bench.env import Stack
from bench.plot import plot_cycle, title_of
from bench.scenarios import PRESETS, SCENARIOS
from dispatcher.config import DispatcherSettings

RESULTS = Path(__file__).resolve().parent / "results"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="small sizes (about 3 minutes)")  # fmt: skip
    mode.add_argument("--tiny", action="store_const", const="tiny", dest="mode",
                      help="smallest sizes: checks the bench itself (smoke test)")  # fmt: skip
    parser.set_defaults(mode="full")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS),
                        help="run only these scenarios")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="where latest.json and latest.md go")  # fmt: skip
    parser.add_argument("--scale-rbs", type=int, default=None,
                        help="RBs in the scale scenario (10 runs each)")  # fmt: skip
    parser.add_argument("--api-qps", type=float, default=None,
                        help="dispatcher API budget (QPS) instead of its default")  # fmt: skip
    parser.add_argument("--api-burst", type=int, default=None,
                        help="the dispatcher's API burst instead of its default")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=None,
                        help="the dispatcher's concurrency (= prefetch)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None,
                        help="state of the stack (default: a new dir under /var/tmp)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sizes = PRESETS[args.mode]
    if args.scale_rbs:
        sizes = dataclasses.replace(sizes, scale_rbs=args.scale_rbs)
    # Not under /tmp: runner pods get an emptyDir there and could not see the gate file.
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autoreduce-bench-", dir="/var/tmp"))
    overrides = {key: value for key in ("api_qps", "api_burst", "concurrency")
                 if (value := getattr(args, key)) is not None}  # fmt: skip
    defaults = DispatcherSettings.model_validate(overrides)
    results: dict[str, Any] = {
        "machine": machine.describe(kube_bin=Path.home() / ".cache/autoreduce/bin"),
        "settings": {
            "mode": args.mode,
            "sizes": sizes.__dict__,
            "api_qps": defaults.api_qps,
            "api_burst": defaults.api_burst,
            "concurrency": defaults.concurrency,
            "budget_note": (
                "the dispatcher runs with its default client-side API budget; the limit has none"
                if not overrides
                else f"the dispatcher's settings were overridden ({overrides}); the limit has none"
            ),
            "workdir": str(workdir),
        },
    }
    previous = report.previous(args.out / "latest.json")
    if previous:
        results["previous"] = previous  # "before" beside this run's "after"
    print(f"[bench] {args.mode} mode; stack state in {workdir}", flush=True)
    # SIGTERM unwinds like Ctrl-C, so the broker (its own session) is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    stack = Stack.start(workdir, keep_files=bool(args.workdir))
    stack.dispatcher_overrides = overrides
    failed = False
    try:
        up_s = time.monotonic() - started
        print(f"[bench] stack {stack.stack_id} up in {up_s:.0f} s", flush=True)
        for name in args.only:
            print(f"[bench] {name} ...", flush=True)
            begun = time.monotonic()
            try:
                results[name] = SCENARIOS[name](stack, sizes)
            except Exception as error:
                failed = True
                traceback.print_exc()
                results[name] = {"error": repr(error)}
            results[name]["seconds"] = round(time.monotonic() - begun, 1)
            if name == "cycle" and "series" in results[name]:
                picture = plot_cycle(results[name], args.out / "busy-cycle.png",
                                     title=title_of(results[name]))
                results[name]["png"] = picture.name
            print(f"[bench] {name} done in {results[name]['seconds']} s", flush=True)
            report.write(results, args.out)  # so far: a long run leaves partial figures
    finally:
        # The stack's folder (etcd data, KahaDB, logs) goes unless a scenario failed
        # or the user named it; then it stays for its logs, and we say where.
        keep = failed or bool(args.workdir)
        stack.stop(keep_files=keep)
        if keep:
            print(f"[bench] stack folder kept: {workdir}", flush=True)
    results["machine"]["load_at_end"] = machine.load()
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["total_seconds"] = round(time.monotonic() - started, 1)
    json_path, md_path, table = report.write(results, args.out)
    print(table)
    print(f"[bench] wrote {json_path} and {md_path} ({results['total_seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The supervised child: ``python -m autoreduce_runner.child <job.json>``.

Reads the job the admin wrote, runs the script (``script.run_script``) with its
stdout/stderr already pointing at the admin's pipe, and writes a small JSON result
file. Then it leaves with ``os._exit`` so that threads or atexit hooks left behind
by the script cannot keep it alive (the admin's timeout would catch that anyway).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from autoreduce_runner.script import ScriptFault, WebVars, run_script

# Exit statuses of the child itself (the admin reads the result file, not these).
EXIT_DONE = 0
EXIT_BAD_JOB = 70


def _result(job: dict[str, Any]) -> dict[str, Any]:
    web_vars = WebVars(
        standard_vars=job.get("standard_vars", {}), advanced_vars=job.get("advanced_vars", {})
    )
    try:
        outcome = run_script(
            text=Path(job["script_path"]).read_text(encoding="utf-8"),
            path=job["script_path"],
            web_vars=web_vars,
            run_numbers=job["run_numbers"],
            input_file=job["input_file"],
            output_dir=job["output_dir"],
        )
    except ScriptFault as fault:
        if fault.detail:
            sys.stderr.write(fault.detail)
        return {"status": "error", "message": fault.describe()}
    if outcome.skipped:
        return {"status": "skipped", "reason": outcome.reason}
    return {"status": "complete", "output_dirs": outcome.output_dirs}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m autoreduce_runner.child <job.json>\n")
        return EXIT_BAD_JOB
    try:
        job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        sys.argv = [job["script_path"]]
        result = _result(job)
        Path(job["result_file"]).write_text(json.dumps(result), encoding="utf-8")
    except (OSError, KeyError, ValueError):
        traceback.print_exc()
        return EXIT_BAD_JOB
    return EXIT_DONE


if __name__ == "__main__":
    code = main(sys.argv)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)

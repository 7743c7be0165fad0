#!/usr/bin/env bash
# The demo: install what is missing, then bring up a real broker and control plane,
# run the dispatcher and reduce sample runs end to end. --keep leaves it running.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
export PATH="$ROOT/.venv/bin:${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}:$PATH"
exec python "$ROOT/scripts/demo.py" "$@"

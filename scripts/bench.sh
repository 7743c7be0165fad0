#!/usr/bin/env bash
# The benchmarks: install what is missing, then start a real broker and control
# plane, run every scenario beside "the limit" (the same client and objects on the
# same apiserver) and write bench/results/latest.{json,md}. --quick for small sizes.
# See bench/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/bootstrap.sh"
export PATH="$ROOT/.venv/bin:${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}:$PATH"
export PYTHONPATH="$ROOT:$ROOT/common:$ROOT/runner-image${PYTHONPATH:+:$PYTHONPATH}"
exec python -m bench "$@"

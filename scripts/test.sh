#!/usr/bin/env bash
# The whole test suite: install what is missing, lint, type-check, then pytest
# against a real ActiveMQ broker and a real Kubernetes control plane that the
# fixtures start and stop. Extra arguments go to pytest (e.g. --long, -k name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/bootstrap.sh"
export PATH="$ROOT/.venv/bin:${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}:$PATH"
echo "[test] ruff";         ruff check .
echo "[test] mypy";         mypy
echo "[test] import layers"; lint-imports
echo "[test] hadolint";     hadolint Dockerfile.dispatcher Dockerfile.runner
echo "[test] pytest"
# CI must fail, not skip, when a real component cannot start (see tests/conftest.py).
exec python -m pytest tests "$@"

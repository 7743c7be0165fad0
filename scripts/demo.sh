#!/usr/bin/env bash
# The demo: install what is missing (scripts/bootstrap.sh), then scripts/demo.py brings
# up a real broker, control plane and node (kubelet + containerd running the images it
# builds from the Dockerfiles), `helm install`s the chart, runs `helm test`, submits
# sample runs with the `autoreduce` CLI and shows how to look at them. Needs root.
# --keep leaves it running.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/bootstrap.sh"
export PATH="$ROOT/.venv/bin:${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}:$PATH"
exec python "$ROOT/scripts/demo.py" "$@"

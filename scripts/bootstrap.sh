#!/usr/bin/env bash
# Install everything the demo and the test suite need, idempotently, on Debian.
#   - Debian packages: ActiveMQ (and Java), openssl, util-linux (unshare), python3-venv
#   - .venv: the project and its test tools (Debian's python3, so non-root pod
#     processes run by the test node agent can use it too)
#   - the control plane (etcd, kube-apiserver, kube-controller-manager) and helm,
#     built from their Go modules once and cached in ~/.cache/autoreduce/bin
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}"
HELM_VERSION=v3.22.0
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[bootstrap] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

need_apt=()
[ -e /usr/share/activemq/bin/activemq.jar ] || need_apt+=(activemq)
command -v java >/dev/null || need_apt+=(default-jre-headless)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v setpriv >/dev/null || need_apt+=(util-linux)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v git >/dev/null || need_apt+=(git)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  [ "$(id -u)" = 0 ] || die "need root to install ${need_apt[*]} (or install them first)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" \
    >/dev/null || die "apt-get install ${need_apt[*]} failed"
  # The package's own service would hold port 61616; the harness runs its own brokers.
  systemctl disable --now activemq >/dev/null 2>&1 || true
fi

command -v go >/dev/null || die "Go (>= 1.21) is required to build the control plane: install golang or put go on PATH"

# Python environment (Debian's python3: /root is not traversable by pod users).
if [ ! -x "$ROOT/.venv/bin/python" ] || ! "$ROOT/.venv/bin/python" -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)'; then
  say "creating .venv with /usr/bin/python3"
  rm -rf "$ROOT/.venv"
  /usr/bin/python3 -m venv "$ROOT/.venv" || die "python3 -m venv failed"
fi
stamp="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  say "pip install -e .[test]"
  "$ROOT/.venv/bin/pip" install -q --upgrade pip >/dev/null
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]" || die "pip install failed"
  touch "$stamp"
fi

# Control plane from the official Go modules (hack/controlplane), cached by content.
mkdir -p "$BIN"
cp_hash="$(cat "$ROOT"/hack/controlplane/go.mod "$ROOT"/hack/controlplane/go.sum "$ROOT"/hack/controlplane/cmd/*/main.go | sha256sum | cut -c1-16)"
if [ ! -e "$BIN/.controlplane-$cp_hash" ]; then
  say "building etcd, kube-apiserver, kube-controller-manager (first time: ~15 min on 2 cores)"
  (cd "$ROOT/hack/controlplane" && go build -o "$BIN/" ./cmd/...) || die "control plane build failed"
  touch "$BIN/.controlplane-$cp_hash"
fi
if [ ! -x "$BIN/helm" ] || ! "$BIN/helm" version --short 2>/dev/null | grep -q "${HELM_VERSION%.*}"; then
  say "building helm $HELM_VERSION"
  GOBIN="$BIN" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "helm build failed"
fi
say "ready: $(ls "$BIN" | tr '\n' ' ')"

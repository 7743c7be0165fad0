#!/usr/bin/env bash
# Install everything the demo and the test suite need, idempotently, on Debian.
#   - Debian packages: ActiveMQ (and Java), openssl, util-linux (unshare), python3-venv
#   - .venv: the project and its test tools (Debian's python3, so non-root pod
#     processes run by the test node agent can use it too)
#   - a real node's packages: docker.io, containerd, runc, CNI plugins, debootstrap
#   - the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
#     the kubelet and helm, built from their Go modules once and cached in
#     ~/.cache/autoreduce/bin
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
# A real node (devstack/): an image engine, a CRI runtime, CNI plugins, and debootstrap
# for the images' base when no registry can be reached.
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v containerd >/dev/null || need_apt+=(containerd)
command -v runc >/dev/null || need_apt+=(runc)
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nsenter >/dev/null || need_apt+=(util-linux)
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

# Control plane and node from the official Go modules (hack/controlplane), cached by
# content (the stamp covers the module graph, every main and the version stamped in).
# Without -X the binaries report v0.0.0-master+$Format:%H$, which kubectl cannot parse
# and a kubelet would put in its Node status; upstream stamps both version packages.
mkdir -p "$BIN"
k8s_version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$ROOT/hack/controlplane/go.mod")"
[[ "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "cannot read the k8s.io/kubernetes version from hack/controlplane/go.mod"
k8s_major="${BASH_REMATCH[1]}" k8s_minor="${BASH_REMATCH[2]}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done
cp_hash="$( (cat "$ROOT"/hack/controlplane/go.mod "$ROOT"/hack/controlplane/go.sum "$ROOT"/hack/controlplane/cmd/*/main.go; echo "$ldflags") | sha256sum | cut -c1-16)"
if [ ! -e "$BIN/.controlplane-$cp_hash" ]; then
  say "building etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet $k8s_version (first time: ~17 min on 2 cores)"
  (cd "$ROOT/hack/controlplane" && go build -ldflags "$ldflags" -o "$BIN/" ./cmd/...) || die "control plane build failed"
  rm -f "$BIN"/.controlplane-*
  touch "$BIN/.controlplane-$cp_hash"
fi
if [ ! -x "$BIN/helm" ] || ! "$BIN/helm" version --short 2>/dev/null | grep -q "${HELM_VERSION%.*}"; then
  say "building helm $HELM_VERSION"
  GOBIN="$BIN" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || die "helm build failed"
fi
say "ready: $(ls "$BIN" | tr '\n' ' ')"

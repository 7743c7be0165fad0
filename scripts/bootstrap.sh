#!/usr/bin/env bash
# Install everything the demo and the test suite need, idempotently, on Debian.
#   - Debian packages: ActiveMQ (and Java), openssl, util-linux (unshare), python3-venv
#   - .venv: the project and its test tools (Debian's python3, so non-root pod
#     processes run by the test node agent can use it too)
#   - a real node's packages: docker.io, containerd, runc, CNI plugins, debootstrap
#   - Go, when no go on PATH is as new as hack/controlplane/go.mod needs: the toolchain
#     module golang.org/toolchain from the Go module proxy ($GOPROXY), checked against
#     its go.sum hash and cached in ~/.cache/autoreduce/go
#   - the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
#     the kubelet and helm, built from their Go modules once and cached in
#     ~/.cache/autoreduce/bin
# Sourcing this file (`source scripts/bootstrap.sh`) only defines the functions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${AUTOREDUCE_BIN:-$HOME/.cache/autoreduce/bin}"
HELM_VERSION=v3.22.0
# The Go release fetched when the go on PATH is missing or too old (the one CI builds with).
GO_FETCH_VERSION="${AUTOREDUCE_GO_VERSION:-1.26.8}"
GO_CACHE="${AUTOREDUCE_GO_CACHE:-$HOME/.cache/autoreduce/go}"
# go.sum hashes of the toolchain modules of GO_FETCH_VERSION's default, as the Go
# checksum database records them (lookup golang.org/toolchain@v0.0.1-go<version>.linux-<arch>).
# A version not listed is checked against the checksum database through the proxy.
declare -gA GO_TOOLCHAIN_H1=(
  [1.26.8.linux-amd64]="h1:ZOmGe1OnfREDMIdb1Qi4G9JSuDPBLGExZMQ4nis1RXM="
  [1.26.8.linux-arm64]="h1:sYL/O6MqS68ML0kjsQ36WoYIpJqkw60TxizWUYUKQMc="
)
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[bootstrap] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# A Go version as four sortable numbers: major, minor, kind and number, where kind
# orders a language version (1.26: 0) before its betas (1), release candidates (2)
# and releases (3, number = patch), as the go command orders them:
# 1.26 < 1.26rc1 < 1.26.0 < 1.26.8. Fails on anything else (e.g. a devel build).
go_version_key() {
  local re='^([0-9]+)\.([0-9]+)(\.([0-9]+)|(beta|rc)([0-9]+))?$'
  [[ "${1#go}" =~ $re ]] || return 1
  local major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
  if [ -n "${BASH_REMATCH[4]}" ]; then
    echo "$major $minor 3 ${BASH_REMATCH[4]}"
  elif [ "${BASH_REMATCH[5]}" = beta ]; then
    echo "$major $minor 1 ${BASH_REMATCH[6]}"
  elif [ "${BASH_REMATCH[5]}" = rc ]; then
    echo "$major $minor 2 ${BASH_REMATCH[6]}"
  else
    echo "$major $minor 0 0"
  fi
}

# go_version_ge A B: A is at least B (0), older (1), or either cannot be read (2).
go_version_ge() {
  local ka kb i
  ka="$(go_version_key "$1")" && kb="$(go_version_key "$2")" || return 2
  local -a a b
  read -ra a <<<"$ka"
  read -ra b <<<"$kb"
  for i in 0 1 2 3; do
    ((10#${a[i]} > 10#${b[i]})) && return 0
    ((10#${a[i]} < 10#${b[i]})) && return 1
  done
  return 0
}

# The Go version a go.mod needs: its go line, or its toolchain line when that is newer.
go_required() {
  local gomod="$1" want toolchain
  want="$(awk '$1 == "go" {print $2; exit}' "$gomod")"
  toolchain="$(awk '$1 == "toolchain" {sub(/^go/, "", $2); print $2; exit}' "$gomod")"
  go_version_key "$want" >/dev/null || die "no readable go line in $gomod"
  if [ -n "$toolchain" ] && go_version_ge "$toolchain" "$want"; then
    want="$toolchain"
  fi
  echo "$want"
}

# The version of a go binary itself (never a toolchain it would switch to), e.g. 1.26.8.
go_local_version() {
  local v
  v="$(GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null)" || v="$("$1" version 2>/dev/null | awk '{print $3}')" || return 1
  echo "${v#go}"
}

go_arch() {
  case "$(uname -m)" in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) die "no Go toolchain for this machine ($(uname -m)): install Go $(go_required "$ROOT/hack/controlplane/go.mod") or newer and put it on PATH" ;;
  esac
}

# The module proxies of $GOPROXY that can be read by URL, in order ("direct" and
# "off" cannot: without a go command there is nothing to fetch a VCS with).
go_proxies() {
  local entry
  for entry in $(tr ',|' '  ' <<<"${GOPROXY:-https://proxy.golang.org}"); do
    [[ "$entry" =~ ^(https?|file):// ]] && echo "${entry%/}"
  done
  return 0
}

# The go.sum hash (h1:) of a module zip: SHA-256 over the sorted lines
# "<sha256 of the file>  <name in the zip>", base64, as golang.org/x/mod/sumdb/dirhash.
# Reading every member also checks every CRC, so a truncated or corrupt zip fails here.
go_zip_h1() {
  python3 - "$1" <<'PY'
import base64, hashlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    summary = hashlib.sha256()
    for name in sorted(z.namelist()):
        if "\n" in name:
            sys.exit(f"file name with a newline in {sys.argv[1]}")
        summary.update(f"{hashlib.sha256(z.read(name)).hexdigest()}  {name}\n".encode())
print("h1:" + base64.b64encode(summary.digest()).decode())
PY
}

# Unpack a module zip whose members all lie under PREFIX into DEST, without PREFIX.
# Module zips keep no file modes: bin/ and pkg/tool/ are made executable, as the go
# command does for a toolchain it downloads.
go_zip_extract() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, sys, zipfile
from pathlib import Path, PurePosixPath
archive, prefix, dest = sys.argv[1], sys.argv[2].rstrip("/") + "/", Path(sys.argv[3])
with zipfile.ZipFile(archive) as z:
    for info in z.infolist():
        rel = PurePosixPath(info.filename[len(prefix):])
        if (not info.filename.startswith(prefix) or rel.is_absolute()
                or ".." in rel.parts or not rel.parts):
            sys.exit(f"{archive}: {info.filename!r} is not under {prefix}")
        if info.is_dir():
            continue
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(info))
        executable = rel.parts[0] == "bin" or rel.parts[:2] == ("pkg", "tool")
        os.chmod(target, 0o755 if executable else 0o644)
PY
}

# The go.sum hash the checksum database ($GOSUMDB, through the proxy as the go command
# reads it) records for module MOD at VERSION.
go_sumdb_h1() {
  local proxy="$1" mod="$2" version="$3" db="${GOSUMDB:-sum.golang.org}"
  db="${db%% *}"
  db="${db%%+*}"
  curl -fsS --retry 2 --connect-timeout 20 "$proxy/sumdb/$db/lookup/$mod@$version" |
    awk -v m="$mod" -v v="$version" '$1 == m && $2 == v {print $3; exit}'
}

go_cached() {
  local root="$1" version="$2"
  [ -x "$root/bin/go" ] && [ -e "$root/.autoreduce-verified" ] &&
    [ "$(go_local_version "$root/bin/go" 2>/dev/null)" = "$version" ]
}

# go_fetch VERSION: make $GO_CACHE/go<VERSION> a checked Go toolchain, downloading it
# from the module proxy unless it is there already.
go_fetch() {
  local version="$1" arch mod zip_name root proxy expected got got_version fetched=""
  arch="$(go_arch)"
  mod="v0.0.1-go$version.linux-$arch"
  zip_name="golang.org/toolchain@$mod"
  root="$GO_CACHE/go$version"
  if go_cached "$root" "$version"; then
    say "go $version: cached in $root"
    return 0
  fi
  command -v curl >/dev/null || die "curl is needed to fetch Go $version"
  command -v python3 >/dev/null || die "python3 is needed to check and unpack Go $version"
  mkdir -p "$GO_CACHE"
  GO_FETCH_TMP="$(mktemp -d "$GO_CACHE/.fetch-go$version.XXXXXX")"
  trap 'rm -rf -- "${GO_FETCH_TMP:-}"' EXIT
  for proxy in $(go_proxies); do
    say "go $version: downloading $zip_name from $proxy (about 72 MB)"
    if curl -fsSL --retry 3 --connect-timeout 20 -o "$GO_FETCH_TMP/toolchain.zip" \
      "$proxy/golang.org/toolchain/@v/$mod.zip"; then
      fetched="$proxy"
      break
    fi
  done
  [ -n "$fetched" ] || die "could not download $zip_name from any proxy in GOPROXY=${GOPROXY:-https://proxy.golang.org}; install Go $version or newer and put it on PATH, or set GOPROXY to a module proxy that can be reached"
  got="$(go_zip_h1 "$GO_FETCH_TMP/toolchain.zip")" || die "$zip_name from $fetched is not a valid zip"
  expected="${GO_TOOLCHAIN_H1[$version.linux-$arch]:-}"
  if [ -n "$expected" ]; then
    [ "$got" = "$expected" ] || die "$zip_name from $fetched has hash $got, expected $expected (the checksum database's, pinned in scripts/bootstrap.sh)"
    say "go $version: hash $got matches the one pinned in scripts/bootstrap.sh"
  elif [ "${GOSUMDB:-}" = off ]; then
    say "go $version: GOSUMDB=off, so its hash $got is not checked"
  else
    expected="$(go_sumdb_h1 "$fetched" golang.org/toolchain "$mod")" ||
      die "could not look $zip_name up in the checksum database through $fetched"
    [ -n "$expected" ] || die "the checksum database has no hash for $zip_name"
    [ "$got" = "$expected" ] || die "$zip_name from $fetched has hash $got, the checksum database says $expected"
    say "go $version: hash $got matches the checksum database's"
  fi
  go_zip_extract "$GO_FETCH_TMP/toolchain.zip" "$zip_name" "$GO_FETCH_TMP/go" ||
    die "could not unpack $zip_name"
  [ -x "$GO_FETCH_TMP/go/bin/go" ] || die "$zip_name has no bin/go"
  got_version="$(go_local_version "$GO_FETCH_TMP/go/bin/go")" || die "the fetched bin/go does not run"
  [ "$got_version" = "$version" ] || die "the fetched bin/go says it is go $got_version, not $version"
  echo "$got" >"$GO_FETCH_TMP/go/.autoreduce-verified"
  rm -rf -- "$root"
  mv "$GO_FETCH_TMP/go" "$root"
  rm -rf -- "$GO_FETCH_TMP"
  GO_FETCH_TMP=""
  say "go $version: ready in $root"
}

# Put a go on PATH that can build hack/controlplane: the one there if it is new enough,
# else the fetched GO_FETCH_VERSION.
ensure_go() {
  local need have
  need="$(go_required "$ROOT/hack/controlplane/go.mod")"
  if command -v go >/dev/null && have="$(go_local_version go)" && go_version_ge "$have" "$need"; then
    return 0
  fi
  if command -v go >/dev/null; then
    say "go on PATH ($(command -v go)) is ${have:-unreadable}; hack/controlplane/go.mod needs $need or newer"
  else
    say "no go on PATH; hack/controlplane/go.mod needs $need or newer"
  fi
  go_version_ge "$GO_FETCH_VERSION" "$need" ||
    die "AUTOREDUCE_GO_VERSION=$GO_FETCH_VERSION is older than the $need that hack/controlplane/go.mod needs"
  go_fetch "$GO_FETCH_VERSION"
  export PATH="$GO_CACHE/go$GO_FETCH_VERSION/bin:$PATH"
}

main() {
  local need_apt=()
  [ -e /usr/share/activemq/bin/activemq.jar ] || need_apt+=(activemq)
  command -v java >/dev/null || need_apt+=(default-jre-headless)
  command -v openssl >/dev/null || need_apt+=(openssl)
  command -v unshare >/dev/null || need_apt+=(util-linux)
  command -v setpriv >/dev/null || need_apt+=(util-linux)
  /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
  command -v git >/dev/null || need_apt+=(git)
  command -v curl >/dev/null || need_apt+=(curl ca-certificates)
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

  ensure_go

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
    "$ROOT/.venv/bin/pip" install -q -e "${ROOT}[test]" || die "pip install failed"
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
  say "ready: $(find "$BIN" -maxdepth 1 -type f ! -name ".*" -printf "%f\n" | sort | tr "\n" " ")"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi

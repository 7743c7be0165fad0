"""scripts/bootstrap.sh's Go fetch, offline: version order, go.mod reading, the go.sum
hash of a module zip, unpacking, and a whole fetch from a file:// module proxy."""

from __future__ import annotations

import os
import platform
import subprocess
import zipfile
from pathlib import Path

import pytest

BOOTSTRAP = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap.sh"
# A zip the go command itself hashed: `go mod download -json example.com/m@v1.0.0`
# from a file:// proxy holding exactly STAND_IN's files printed this Sum.
STAND_IN_PREFIX = "example.com/m@v1.0.0/"
STAND_IN = {"go.mod": "module example.com/m\n", "bin/go": "#!/bin/sh\necho go\n",
            "README": "toolchain stand-in\n"}
STAND_IN_H1 = "h1:I3BSQbmR0q4/pPKSixhs+MYYVtvadCoXIV9RySiDrXI="


def bash(script: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f'source "{BOOTSTRAP}"\n{script}'],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def write_zip(path: Path, prefix: str, files: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(prefix + name, text)
    return path


@pytest.mark.parametrize(("a", "b", "at_least"), [
    ("1.26.8", "1.26.0", True),
    ("1.26.0", "1.26.0", True),
    ("1.26.0", "1.26", True),
    ("1.26rc1", "1.26", True),
    ("1.26.0", "1.26rc2", True),
    ("1.26rc2", "1.26rc10", False),
    ("1.26beta1", "1.26rc1", False),
    ("1.25.9", "1.26.0", False),
    ("1.9.0", "1.26.0", False),
    ("1.100.0", "1.26.0", True),
    ("2.0", "1.99.99", True),
    ("go1.26.8", "1.26.08", True),
])
def test_version_order_is_the_go_commands(a: str, b: str, at_least: bool) -> None:
    assert bash(f"go_version_ge {a} {b}").returncode == (0 if at_least else 1)


@pytest.mark.parametrize("unreadable", ["devel", "1", "1.26.x", "", "1.26.0-pre"])
def test_an_unreadable_version_satisfies_nothing(unreadable: str) -> None:
    assert bash(f"go_version_ge '{unreadable}' 1.21").returncode == 2


@pytest.mark.parametrize(("gomod", "needed"), [
    ("module m\n\ngo 1.26.0\n", "1.26.0"),
    ("module m\n\ngo 1.26.0\n\ntoolchain go1.26.8\n", "1.26.8"),
    ("module m\n\ngo 1.26.0\n\ntoolchain go1.25.1\n", "1.26.0"),
    ("module m\ngo 1.26.0\ntoolchain default\n", "1.26.0"),
])
def test_required_version_from_go_mod(tmp_path: Path, gomod: str, needed: str) -> None:
    (tmp_path / "go.mod").write_text(gomod)
    result = bash(f'go_required "{tmp_path}/go.mod"')
    assert (result.returncode, result.stdout.strip()) == (0, needed)


def test_required_version_of_the_control_plane_is_what_is_fetched() -> None:
    result = bash('go_required "$ROOT/hack/controlplane/go.mod" && go_version_ge '
                  '"$GO_FETCH_VERSION" "$(go_required "$ROOT/hack/controlplane/go.mod")"')
    assert result.returncode == 0, result.stderr


def test_zip_hash_is_the_go_sum_hash(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "m.zip", STAND_IN_PREFIX, STAND_IN)
    result = bash(f'go_zip_h1 "{archive}"')
    assert (result.returncode, result.stdout.strip()) == (0, STAND_IN_H1)


def test_zip_hash_fails_on_a_truncated_zip(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "m.zip", STAND_IN_PREFIX, STAND_IN)
    archive.write_bytes(archive.read_bytes()[:-40])
    assert bash(f'go_zip_h1 "{archive}"').returncode != 0


def test_extract_strips_the_prefix_and_makes_tools_executable(tmp_path: Path) -> None:
    files = {**STAND_IN, "pkg/tool/linux_amd64/compile": "x", "src/fmt/print.go": "package fmt\n"}
    archive = write_zip(tmp_path / "m.zip", STAND_IN_PREFIX, files)
    result = bash(f'go_zip_extract "{archive}" "{STAND_IN_PREFIX}" "{tmp_path}/out"')
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(files)
    assert os.access(out / "bin" / "go", os.X_OK)
    assert os.access(out / "pkg" / "tool" / "linux_amd64" / "compile", os.X_OK)
    assert not os.access(out / "src" / "fmt" / "print.go", os.X_OK)


@pytest.mark.parametrize("bad", ["other@v1/bin/go", STAND_IN_PREFIX + "../../escape"])
def test_extract_refuses_names_outside_the_prefix(tmp_path: Path, bad: str) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(bad, "x")
    result = bash(f'go_zip_extract "{archive}" "{STAND_IN_PREFIX}" "{tmp_path}/out"')
    assert result.returncode != 0
    assert not (tmp_path / "escape").exists()


def fake_toolchain_proxy(root: Path, version: str, arch: str) -> Path:
    """A file:// module proxy serving a toolchain whose bin/go only tells its version."""
    mod = f"v0.0.1-go{version}.linux-{arch}"
    go = f'#!/bin/sh\n[ "$1 $2" = "env GOVERSION" ] && echo go{version} && exit 0\n' \
         f'echo "go version go{version} linux/{arch}"\n'
    write_zip(root / "golang.org" / "toolchain" / "@v" / f"{mod}.zip",
              f"golang.org/toolchain@{mod}/", {"bin/go": go, "src/README": "stand-in\n"})
    return root


def fetch_env(tmp_path: Path, proxy: Path) -> dict[str, str]:
    """No network, a cache under tmp_path, and a go on PATH too old for the control plane."""
    old = tmp_path / "old-go"
    old.mkdir(exist_ok=True)
    (old / "go").write_text('#!/bin/sh\n[ "$1 $2" = "env GOVERSION" ] && echo go1.19.8 && exit 0\n'
                            'echo "go version go1.19.8 linux/amd64"\n')
    (old / "go").chmod(0o755)
    return {"HOME": str(tmp_path / "home"), "PATH": f"{old}:/usr/bin:/bin", "GOSUMDB": "off",
            "GOPROXY": f"file://{proxy},direct"}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="no Go toolchain arch")
def test_fetch_unpacks_checks_and_then_reuses_the_cache(tmp_path: Path) -> None:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    proxy = fake_toolchain_proxy(tmp_path / "proxy", "9.9.9", arch)
    h1 = bash(f'go_zip_h1 "{next(proxy.rglob("*.zip"))}"').stdout.strip()
    env = fetch_env(tmp_path, proxy)
    pin = f'GO_TOOLCHAIN_H1[9.9.9.linux-{arch}]="{h1}"; '
    first = bash(pin + "GO_FETCH_VERSION=9.9.9 ensure_go && go version", env=env)
    assert first.returncode == 0, first.stderr
    assert "go on PATH" in first.stdout and "is 1.19.8" in first.stdout
    assert f"go version go9.9.9 linux/{arch}" in first.stdout
    assert "matches the one pinned" in first.stdout
    cached = tmp_path / "home" / ".cache" / "autoreduce" / "go" / "go9.9.9"
    assert (cached / ".autoreduce-verified").read_text().strip() == h1
    assert not list(cached.parent.glob(".fetch-*"))
    next(proxy.rglob("*.zip")).unlink()  # a second run must not need the proxy
    second = bash("GO_FETCH_VERSION=9.9.9 ensure_go && go version", env=env)
    assert second.returncode == 0, second.stderr
    assert "cached in" in second.stdout and "downloading" not in second.stdout


def test_fetch_fails_loudly_on_a_hash_mismatch(tmp_path: Path) -> None:
    arch = bash("go_arch").stdout.strip()
    proxy = fake_toolchain_proxy(tmp_path / "proxy", "9.9.9", arch)
    wrong = f'GO_TOOLCHAIN_H1[9.9.9.linux-{arch}]="{STAND_IN_H1}"; '
    result = bash(wrong + "GO_FETCH_VERSION=9.9.9 ensure_go", env=fetch_env(tmp_path, proxy))
    assert result.returncode == 1
    assert "FAILED" in result.stderr and f"expected {STAND_IN_H1}" in result.stderr
    cache = tmp_path / "home" / ".cache" / "autoreduce" / "go"
    assert not (cache / "go9.9.9").exists() and not list(cache.glob(".fetch-*"))


def test_fetch_fails_loudly_when_nothing_serves_it(tmp_path: Path) -> None:
    env = fetch_env(tmp_path, tmp_path / "empty-proxy")
    result = bash("GO_FETCH_VERSION=9.9.9 ensure_go", env=env)
    assert result.returncode == 1
    assert "could not download golang.org/toolchain@v0.0.1-go9.9.9" in result.stderr

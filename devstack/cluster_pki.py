"""Throwaway PKI for the local control plane, made with the ``openssl`` CLI.

One CA signs everything: the apiserver's serving cert, the client certs (admin,
controller-manager, apiserver-to-kubelet); devstack.pki issues the kubelets' and the
scheduler's identities from the same CA. The
service-account key pair signs and verifies bound tokens. Cert keys are ECDSA P-256
(made in milliseconds, accepted by every component); the service-account key is RSA
because RS256 is what every token consumer expects.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    kubelet_client: CertPair
    sa_key: Path  # private: signs service-account tokens
    sa_pub: Path  # public: verifies them


def openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def make_ca(directory: Path, *, name: str = "autoreduce-test-ca") -> CertPair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "ca.crt", directory / "ca.key")
    openssl(
        "req", "-x509", "-new", "-nodes", "-sha256",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "3650",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    return pair


def issue(
    ca: CertPair,
    directory: Path,
    *,
    stem: str,
    common_name: str,
    organisation: str | None = None,
    sans: tuple[str, ...] = (),
    server: bool = False,
    client: bool = False,
) -> CertPair:
    """A leaf cert signed by ``ca``; ``sans`` are IPs or DNS names."""
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    csr = directory / f"{stem}.csr"
    subject = f"/CN={common_name}" + (f"/O={organisation}" if organisation else "")
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(pair.key),
        "-out", str(csr), "-subj", subject,
    )  # fmt: skip
    usages = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
    ext_lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={','.join(usages)}",
    ]
    if sans:
        ext_lines.append("subjectAltName=" + ",".join(san_entry(s) for s in sans))
    ext = directory / f"{stem}.ext"
    ext.write_text("\n".join(ext_lines) + "\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "3650", "-sha256",
        "-extfile", str(ext),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return pair


def san_entry(value: str) -> str:
    is_ip = value.replace(".", "").isdigit() or ":" in value
    return f"IP:{value}" if is_ip else f"DNS:{value}"


def make_service_account_keys(directory: Path) -> tuple[Path, Path]:
    key, pub = directory / "sa.key", directory / "sa.pub"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    openssl("pkey", "-in", str(key), "-pubout", "-out", str(pub))
    return key, pub


def make_cluster_pki(directory: Path, *, service_ip: str = "10.0.0.1") -> ClusterPKI:
    """Everything the apiserver, controller-manager and admin client need."""
    ca = make_ca(directory)
    apiserver = issue(
        ca, directory, stem="apiserver", common_name="kube-apiserver", server=True,
        sans=(
            "127.0.0.1", "localhost", service_ip, "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
        ),
    )  # fmt: skip
    admin = issue(
        ca, directory, stem="admin", common_name="kubernetes-admin",
        organisation="system:masters", client=True,
    )  # fmt: skip
    # The bootstrap RBAC policy binds exactly this user name to the controller-manager role.
    controller_manager = issue(
        ca, directory, stem="controller-manager",
        common_name="system:kube-controller-manager", client=True,
    )  # fmt: skip
    # system:masters so the apiserver may proxy logs from (and exec into) the kubelets.
    kubelet_client = issue(
        ca, directory, stem="apiserver-kubelet-client",
        common_name="kube-apiserver-kubelet-client", organisation="system:masters", client=True,
    )  # fmt: skip
    sa_key, sa_pub = make_service_account_keys(directory)
    return ClusterPKI(ca, apiserver, admin, controller_manager, kubelet_client, sa_key, sa_pub)

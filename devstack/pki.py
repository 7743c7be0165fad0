"""Client certificates for a node's kubelet and the scheduler, signed by the
cluster's CA with the ``openssl`` CLI (the apiserver trusts its --client-ca-file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from devstack.process import run


@dataclass(frozen=True)
class ClusterAccess:
    """What a node or a scheduler needs from the control plane: its URL on the host's
    loopback, and the CA (with its key, to issue the components' own identities)."""

    server: str
    ca_cert: Path
    ca_key: Path

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])


def issue_client_cert(access: ClusterAccess, directory: Path, *, stem: str, user: str,
                      group: str | None = None) -> tuple[Path, Path]:  # fmt: skip
    """ECDSA P-256 (made in milliseconds); the subject is the identity RBAC and the
    Node authorizer see: CN is the user, O the group."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = (directory / f"{stem}.{ext}" for ext in ("crt", "key", "csr"))
    ext = directory / f"{stem}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=clientAuth\n")  # fmt: skip
    subject = f"/CN={user}" + (f"/O={group}" if group else "")
    run(["openssl", "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(csr),
         "-subj", subject], what=f"key for {user}")  # fmt: skip
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(access.ca_cert),
         "-CAkey", str(access.ca_key), "-CAcreateserial", "-CAserial", str(directory / "ca.srl"),
         "-out", str(cert), "-days", "365", "-sha256", "-extfile", str(ext)],
        what=f"certificate for {user}")  # fmt: skip
    csr.unlink()
    ext.unlink()
    return cert, key


def write_kubeconfig(path: Path, *, server: str, ca: Path, cert: Path, key: Path,
                     tls_server_name: str | None = None) -> Path:  # fmt: skip
    cluster: dict[str, str] = {"server": server, "certificate-authority": str(ca)}
    if tls_server_name:
        cluster["tls-server-name"] = tls_server_name
    user = {"client-certificate": str(cert), "client-key": str(key)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "me", "user": user}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
        "current-context": "local",
    }))  # fmt: skip
    return path

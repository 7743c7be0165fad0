"""TLS material for the test broker's ``stomp+ssl`` connector, made with ``openssl``.

A CA of the broker's own (not the cluster's: a site's broker CA is rarely its
cluster's), a serving certificate that names the addresses clients use, and the
PKCS#12 keystore ActiveMQ's ``sslContext`` reads. ``expired`` makes a certificate
whose validity ended in 2020, for the test that a client says so at start.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from devstack.cluster_pki import CertPair, issue, make_ca, openssl, san_entry

_CA_CONFIG = """[ca]
default_ca = local
[local]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class BrokerTls:
    """What the broker serves (``keystore``) and what its clients trust (``ca``)."""

    ca: CertPair
    server: CertPair
    keystore: Path  # PKCS#12: the server key and certificate chain
    keystore_password: str


def make_broker_tls(directory: Path, *, sans: tuple[str, ...],
                    expired: bool = False) -> BrokerTls:  # fmt: skip
    """A CA and a serving certificate for ``sans`` (IPs or DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, name="autoreduce-test-broker-ca")
    if expired:
        server = _issue_expired(ca, directory, sans=sans)
    else:
        server = issue(ca, directory, stem="broker", common_name="autoreduce-test-broker",
                       sans=sans, server=True)  # fmt: skip
    password = secrets.token_hex(12)
    keystore = directory / "broker.p12"
    openssl("pkcs12", "-export", "-in", str(server.cert), "-inkey", str(server.key),
             "-certfile", str(ca.cert), "-name", "broker", "-out", str(keystore),
             "-passout", f"pass:{password}")  # fmt: skip
    return BrokerTls(ca=ca, server=server, keystore=keystore, keystore_password=password)


def _issue_expired(ca: CertPair, directory: Path, *, sans: tuple[str, ...]) -> CertPair:
    """``openssl x509`` cannot backdate; ``openssl ca`` takes explicit dates."""
    pair = CertPair(directory / "broker.crt", directory / "broker.key")
    csr, ext, conf = (directory / name for name in ("broker.csr", "broker.ext", "ca.cnf"))
    openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-keyout", str(pair.key), "-out", str(csr),
             "-subj", "/CN=autoreduce-test-broker")  # fmt: skip
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    conf.write_text(_CA_CONFIG.format(dir=directory))
    ext.write_text("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
                   "subjectAltName=" + ",".join(san_entry(s) for s in sans) + "\n")  # fmt: skip
    openssl("ca", "-batch", "-notext", "-config", str(conf), "-cert", str(ca.cert),
             "-keyfile", str(ca.key), "-in", str(csr), "-out", str(pair.cert),
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
             "-extfile", str(ext))  # fmt: skip
    return pair

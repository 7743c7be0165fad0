"""The words a TLS failure to the broker is reported in, and the TLS settings (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from autoreduce_common.broker_settings import BrokerSettings, TlsSettings
from autoreduce_common.stomp_client.tls import explain, stomp_params, unloadable
from pydantic import ValidationError

CA = TlsSettings(enabled=True, ca_file=Path("/etc/autoreduce/broker-ca/ca.crt"))


@pytest.mark.parametrize(("verify_message", "says"), [
    ("certificate has expired", "the broker's certificate has expired"),
    ("certificate is not yet valid", "not valid yet: check the clocks"),
    ("Hostname mismatch, certificate is not valid for 'amq'.",
     "the broker's certificate does not name 'amq'"),
    ("IP address mismatch, certificate is not valid for '10.0.0.9'.",
     "the broker's certificate does not name 'amq'"),
    ("unable to get local issuer certificate",
     "not signed by a CA in /etc/autoreduce/broker-ca/ca.crt"),
    ("self-signed certificate in certificate chain",
     "not signed by a CA in /etc/autoreduce/broker-ca/ca.crt"),
])  # fmt: skip
def test_each_verification_failure_says_what_to_fix(verify_message: str, says: str) -> None:
    text = explain(verify_message, host="amq", tls=CA)
    assert says in text, text
    assert verify_message.rstrip(".") in text  # OpenSSL's own words stay, for searching


def test_without_a_ca_file_the_system_store_is_named() -> None:
    text = explain("unable to get local issuer certificate", host="amq",
                   tls=TlsSettings(enabled=True))  # fmt: skip
    assert "not signed by a CA in the system trust store" in text


def test_a_key_without_a_certificate_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"key_file is set but tls\.cert_file is not"):
        TlsSettings(enabled=True, key_file=Path("/k"))


def test_tls_is_off_unless_asked_for() -> None:
    assert BrokerSettings().tls == TlsSettings(enabled=False)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "ca.crt"
    assert unloadable(TlsSettings(enabled=True, ca_file=missing)) == (
        f"tls.ca_file {missing} is not a file (is its Secret or ConfigMap mounted?)")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    problem = unloadable(TlsSettings(enabled=True, ca_file=garbage))
    assert problem is not None and problem.startswith("cannot load the TLS files"), problem
    assert unloadable(TlsSettings(enabled=True)) is None  # the system store loads


def test_stomp_is_given_paths_as_text() -> None:
    tls = TlsSettings(enabled=True, ca_file=Path("/ca"), cert_file=Path("/c"),
                      key_file=Path("/k"))  # fmt: skip
    assert stomp_params(tls) == {"ca_certs": "/ca", "cert_file": "/c", "key_file": "/k"}

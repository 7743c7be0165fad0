"""TLS to the broker: the context stomp.py is told to use, and why a handshake failed.

stomp.py wraps the socket itself with ``PROTOCOL_TLS_CLIENT`` (the certificate chain
and the hostname are both verified), but when the handshake fails it only logs a
warning and reports "could not connect". So when a TLS connection fails, ``diagnose``
repeats the handshake with the same settings and names the reason: a certificate no
configured CA signed, an expired one, a hostname the certificate does not name, TLS
files that cannot be read. None of these fixes itself by retrying, so the client
raises ``BrokerTlsError`` for them and its callers log them as errors (a broker that
is merely down is still a quiet retry).

No stomp here: only the standard library's ``ssl``.
"""

from __future__ import annotations

import socket
import ssl

from autoreduce_common.broker_settings import TlsSettings

# Short: it runs after a failed connect, and a frozen broker accepts TCP but never
# answers the handshake; waiting longer would only slow the reconnect loop down.
HANDSHAKE_TIMEOUT_S = 3.0

# OpenSSL's verify messages for the failures a site will meet, in its admin's words.
_UNTRUSTED = ("unable to get local issuer certificate", "self-signed certificate",
              "self signed certificate", "unable to verify the first certificate")


def context(tls: TlsSettings) -> ssl.SSLContext:
    """The same verification stomp.py applies (tests and ``diagnose`` use it too)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    else:
        ctx.load_default_certs()
    if tls.cert_file is not None:
        key = str(tls.key_file) if tls.key_file is not None else None
        ctx.load_cert_chain(str(tls.cert_file), key)
    return ctx


def stomp_params(tls: TlsSettings) -> dict[str, str | None]:
    """Keyword arguments for stomp.py's ``set_ssl``."""
    return {
        "ca_certs": str(tls.ca_file) if tls.ca_file is not None else None,
        "cert_file": str(tls.cert_file) if tls.cert_file is not None else None,
        "key_file": str(tls.key_file) if tls.key_file is not None else None,
    }


def explain(verify_message: str, *, host: str, tls: TlsSettings) -> str:
    """A certificate verification failure in words that say what to fix."""
    text = verify_message.strip().rstrip(".")
    lowered = text.lower()
    if "expired" in lowered:
        return f"the broker's certificate has expired ({text})"
    if "not yet valid" in lowered:
        return f"the broker's certificate is not valid yet: check the clocks ({text})"
    if "mismatch" in lowered:
        return (f"the broker's certificate does not name {host!r}: add it to the "
                f"certificate's subjectAltName or use a name it has ({text})")
    if any(part in lowered for part in _UNTRUSTED):
        where = str(tls.ca_file) if tls.ca_file is not None else "the system trust store"
        return f"the broker's certificate is not signed by a CA in {where} ({text})"
    return text


def unloadable(tls: TlsSettings) -> str | None:
    """Why the CA bundle or the client certificate cannot be used, or None."""
    for name, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
                       ("key_file", tls.key_file)):
        if path is not None and not path.is_file():
            return f"tls.{name} {path} is not a file (is its Secret or ConfigMap mounted?)"
    try:
        context(tls)
    except (OSError, ssl.SSLError) as problem:
        return f"cannot load the TLS files ({problem})"
    return None


def diagnose(host: str, port: int, tls: TlsSettings,
             *, timeout: float = HANDSHAKE_TIMEOUT_S) -> str | None:
    """Why a TLS connection to ``host:port`` fails for a reason retrying cannot fix, or
    None: the handshake works, or the broker is simply not reachable (an outage)."""
    unusable = unloadable(tls)
    if unusable is not None:
        return unusable
    ctx = context(tls)
    try:
        with (socket.create_connection((host, port), timeout=timeout) as raw,
              ctx.wrap_socket(raw, server_hostname=host)):
            return None
    except ssl.SSLCertVerificationError as problem:
        return explain(problem.verify_message or str(problem), host=host, tls=tls)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return None  # the peer hung up mid-handshake: a restart, not a configuration
    except ssl.SSLError as problem:
        # A plain-STOMP port ("wrong version number"), a refused client certificate.
        return f"the TLS handshake failed: {problem.reason or problem}"
    except OSError:
        return None

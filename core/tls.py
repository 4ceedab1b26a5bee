"""DICOM over TLS (PS3.15 B.9, BCP 195): SSL contexts for the node, SR delivery and `pneumo send`.

TLS 1.2 is the floor. Files are checked when a context is built, at startup, and an error names
the setting and the path, never what the file holds. Keys must be unencrypted PEM (mode 600):
a passphrase prompt would hang a service.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from core.settings import Settings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(RuntimeError):
    """A TLS setting is incomplete, or names a file that is missing, unreadable or not PEM."""


def _readable(setting: str, path: Path) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise TLSConfigError(f"{setting}: cannot read {path}: {error.strerror}") from None
    return str(path)


def _no_passphrase() -> bytes:
    raise TLSConfigError("the private key is encrypted; give an unencrypted PEM key (mode 600)")


def _load_identity(context: ssl.SSLContext, cert_file: Path, key_file: Path, names: tuple[str, str]) -> None:
    certificate, key = _readable(names[0], cert_file), _readable(names[1], key_file)
    try:
        context.load_cert_chain(certificate, key, password=_no_passphrase)
    except TLSConfigError as error:
        raise TLSConfigError(f"{names[1]}: {error}") from None
    except ssl.SSLError as error:
        # The reason (e.g. KEY_VALUES_MISMATCH, NO_START_LINE) is enough; never echo the files.
        raise TLSConfigError(
            f"{names[0]}/{names[1]}: cannot load the certificate and key ({error.reason or error})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: Path, name: str) -> None:
    try:
        context.load_verify_locations(cafile=_readable(name, ca_file))
    except ssl.SSLError as error:
        raise TLSConfigError(f"{name}: cannot load CA certificates from {ca_file} "
                             f"({error.reason or error})") from None


class _DeferredHandshakeContext(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in the thread that accepts connections; with the
    default handshake-on-wrap, one peer that connects and says nothing would stall every other
    association. Deferred, OpenSSL runs the handshake on the association's first read, in the
    association's own thread. The socket timeout bounds a peer that stops mid-handshake (or
    mid-PDU), which would otherwise hold an association slot for ever."""

    socket_timeout_s: float | None = None

    def wrap_socket(  # type: ignore[override]  # narrower on purpose: the node's server sockets
        self, sock: socket.socket, server_side: bool = False, **kwargs: Any
    ) -> ssl.SSLSocket:
        if server_side:
            kwargs["do_handshake_on_connect"] = False
            sock.settimeout(self.socket_timeout_s)
        return super().wrap_socket(sock, server_side=server_side, **kwargs)


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The node's context; None (plain TCP) unless a certificate and key are configured."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_require_client_cert:
            raise TLSConfigError("PNEUMO_TLS_REQUIRE_CLIENT_CERT needs PNEUMO_TLS_CERT_FILE "
                                 "and PNEUMO_TLS_KEY_FILE")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TLSConfigError("PNEUMO_TLS_CERT_FILE and PNEUMO_TLS_KEY_FILE must be set together")
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.socket_timeout_s = settings.network_timeout_s
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, settings.tls_cert_file, settings.tls_key_file,
                   ("PNEUMO_TLS_CERT_FILE", "PNEUMO_TLS_KEY_FILE"))
    if settings.tls_require_client_cert:
        if settings.tls_ca_file is None:
            raise TLSConfigError("PNEUMO_TLS_REQUIRE_CLIENT_CERT needs PNEUMO_TLS_CA_FILE "
                                 "to verify client certificates")
        _load_ca(context, settings.tls_ca_file, "PNEUMO_TLS_CA_FILE")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None,
    names: tuple[str, str, str] = ("PNEUMO_TLS_CA_FILE", "PNEUMO_TLS_CERT_FILE", "PNEUMO_TLS_KEY_FILE"),
) -> ssl.SSLContext:
    """Verifies the peer's certificate and host name against `ca_file` (the system CAs when None);
    presents our certificate when both `cert_file` and `key_file` are given."""
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError(f"{names[1]} and {names[2]} must be given together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = MINIMUM_VERSION
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, ca_file, names[0])
    if cert_file is not None and key_file is not None:
        _load_identity(context, cert_file, key_file, names[1:])
    return context


def pacs_context(settings: Settings) -> ssl.SSLContext | None:
    """For SR delivery: None (plain TCP) unless PNEUMO_PACS_TLS is on."""
    if not settings.pacs_tls:
        return None
    return client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)


def handshake_failure(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> str | None:
    """Why a TLS connection to a peer fails, from one bare handshake (pynetdicom only logs it);
    None when the handshake succeeds or the peer is simply down."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as error:
        return f"the peer's certificate is not trusted ({error.verify_message})"
    except ssl.SSLError as error:
        return f"the TLS handshake failed ({error.reason or error})"
    except OSError:
        return None


def dashboard_context(settings: Settings) -> ssl.SSLContext | None:
    """The dashboard's HTTPS context; None (plain HTTP) unless its certificate and key are set."""
    cert_file, key_file = settings.dashboard_tls_cert_file, settings.dashboard_tls_key_file
    if cert_file is None and key_file is None:
        return None
    names = ("PNEUMO_DASHBOARD_TLS_CERT_FILE", "PNEUMO_DASHBOARD_TLS_KEY_FILE")
    if cert_file is None or key_file is None:
        raise TLSConfigError(f"{names[0]} and {names[1]} must be set together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, cert_file, key_file, names)
    return context


def check(settings: Settings) -> None:
    """Build every configured context once, so a bad file stops startup with a clear message."""
    server_context(settings)
    pacs_context(settings)
    dashboard_context(settings)

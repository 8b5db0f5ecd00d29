"""A validated ``TlsConfig`` in, finished pyOpenSSL contexts out.

Contexts are built completely, once per process, before the first
connection (pyOpenSSL forbids changing a context once it made a connection,
and a fork-server shares them with its children).  Every file is opened
here: a certificate, key or trust anchor that cannot be used is a
``ConfigError`` (exit 96).

Peer checks run inside the handshake: the chain through OpenSSL's own
verification, the name through ``service_identity`` in the verify callback,
so a client that rejects the server sends an alert instead of Finished.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509

from .config import Keypair, TlsConfig, is_ip
from .errors import ConfigError
from .link import ssl_error_text

# Safe defaults for every context: TLS 1.2 at least, no compression, no
# renegotiation, and a bare EOF is not an OpenSSL error (the engine decides).
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF
_SESSION_ID = b"s6tls"


@dataclass
class VerifyNotes:
    """Why the verify callback rejected a peer; kept as the connection's app data."""

    hostname: str | None = None
    reasons: list[str] = field(default_factory=list)


def build_context(cfg: TlsConfig) -> SSL.Context:
    """The context for ``cfg``'s role, with SNI contexts attached for a server.

    Raises ``ConfigError`` if a file cannot be read or used.
    """
    if cfg.role == "client":
        return _client_context(cfg)
    return _server_context(cfg)


def _base_context(cfg: TlsConfig) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_session_id(_SESSION_ID)
    if cfg.verify_peer != "none":
        _load_trust(ctx, cfg)
        mode = SSL.VERIFY_PEER
        if cfg.role == "server" and cfg.verify_peer == "required":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(mode, _verify_callback)
    return ctx


def _check_readable(path: str, what: str) -> None:
    """Raise ``ConfigError`` with the system's reason if ``path`` cannot be opened.

    OpenSSL's own text for a missing file is "system lib", which says nothing.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"unable to read {what}{path}: {exc.strerror}") from None


def _load_trust(ctx: SSL.Context, cfg: TlsConfig) -> None:
    if cfg.cadir and not os.access(cfg.cadir, os.R_OK | os.X_OK):
        raise ConfigError(f"unable to read CADIR {cfg.cadir}: not a readable directory")
    if cfg.cafile:
        _check_readable(cfg.cafile, "CAFILE ")
    try:
        ctx.load_verify_locations(cfg.cafile, cfg.cadir)
        if cfg.role == "server" and cfg.cafile:
            ctx.load_client_ca(cfg.cafile.encode())
    except SSL.Error as exc:
        where = " and ".join(
            f"{n} {v}" for n, v in (("CAFILE", cfg.cafile), ("CADIR", cfg.cadir)) if v
        )
        reason = ssl_error_text(exc)
        raise ConfigError(f"unable to load trust anchors from {where}: {reason}") from None


def _load_keypair(ctx: SSL.Context, pair: Keypair) -> None:
    _check_readable(pair.certfile, "certificate ")
    _check_readable(pair.keyfile, "private key ")
    try:
        ctx.use_certificate_chain_file(pair.certfile)
        ctx.use_privatekey_file(pair.keyfile)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            f"unable to load keypair {pair.certfile} / {pair.keyfile}: {ssl_error_text(exc)}"
        ) from None


def _client_context(cfg: TlsConfig) -> SSL.Context:
    ctx = _base_context(cfg)
    if cfg.options.client_cert and cfg.keypair:
        _load_keypair(ctx, cfg.keypair)
    return ctx


def _server_context(cfg: TlsConfig) -> SSL.Context:
    named: dict[str, SSL.Context] = {}
    for name, pair in cfg.sni_keypairs:
        sub = _base_context(cfg)
        _load_keypair(sub, pair)
        named[name] = sub
    ctx = _base_context(cfg)
    if cfg.keypair and cfg.options.sni_level < 2:
        _load_keypair(ctx, cfg.keypair)
    if named:
        has_default = cfg.keypair is not None and cfg.options.sni_level < 2
        ctx.set_tlsext_servername_callback(_sni_switcher(named, has_default))
    return ctx


def sni_lookup(names: dict[str, SSL.Context], servername: str) -> SSL.Context | None:
    """The context for ``servername``: an exact match, else ``*.`` + its parent.

    A wildcard stands for exactly one label, as in certificates.
    """
    servername = servername.lower().rstrip(".")
    if servername in names:
        return names[servername]
    _label, dot, parent = servername.partition(".")
    return names.get("*." + parent) if dot and parent else None


def _sni_switcher(
    names: dict[str, SSL.Context], has_default: bool
) -> Callable[[SSL.Connection], None]:
    """The SNI callback: switch to the context for the client's name.

    Without a default keypair (-k 2) and no match, the handshake will fail
    for want of a certificate; the reason goes into the connection's
    ``VerifyNotes`` so that the message names the server name, not only
    OpenSSL's "no suitable signature algorithm".  (pyOpenSSL's callback
    cannot abort the handshake itself.)
    """

    def switch(conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        name = raw.decode("ascii", "replace") if raw else ""
        sub = sni_lookup(names, name) if name else None
        if sub is not None:
            conn.set_context(sub)
            return
        notes = conn.get_app_data()
        if not has_default and isinstance(notes, VerifyNotes):
            why = f"no keypair for server name {name}" if name else "client sent no server name"
            notes.reasons.append(f"{why} under -k 2")

    return switch


# OpenSSL's X509_V_ERR_* texts for the chain errors a user meets most.
_CHAIN_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


def _verify_callback(conn: SSL.Connection, cert: X509, errnum: int, depth: int, ok: int) -> bool:
    """OpenSSL's chain verdict, plus the name check at depth 0 when a name is set.

    Why a peer was rejected goes into the connection's ``VerifyNotes``.
    """
    notes = conn.get_app_data()
    if not isinstance(notes, VerifyNotes):
        return bool(ok)
    if not ok:
        text = _CHAIN_ERRORS.get(errnum, f"X509 verify error {errnum}")
        notes.reasons.append(f"certificate verify failed at depth {depth}: {text}")
        return False
    if depth == 0 and notes.hostname:
        reason = check_name(cert.to_cryptography(), notes.hostname)
        if reason:
            notes.reasons.append(reason)
            return False
    return True


def check_name(cert: x509.Certificate, name: str) -> str | None:
    """None if ``cert`` is valid for ``name`` (a DNS name or an IP literal), else why not.

    The matching is ``service_identity``'s (RFC 6125), never ours.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    try:
        if is_ip(name):
            verify_certificate_ip_address(cert, name)
        else:
            verify_certificate_hostname(cert, name)
    except (VerificationError, CertificateError):
        return f"certificate does not match the server name {name}"
    return None

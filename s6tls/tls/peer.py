"""The peer's certificate: what s6tls checks of it, and what it tells the application.

``PeerPolicy.check`` runs inside the handshake, in the verify callback, on
the peer's leaf certificate: the server name a client asked for (``-k``),
the ``TLS_PEER_*`` allow-lists (a peer that any one of them admits is
admitted), and the rule that no string from the certificate may hold a
control character.  It returns why it refuses a certificate, or None.
Names and IP addresses are matched by ``service_identity`` (RFC 6125),
never by code of ours; URIs and email addresses are compared exactly (the
domain of an address without regard to case).

``certificate_facts`` gives the ``SSL_PEER_CERT_*`` variables.
"""

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL.crypto import FILETYPE_ASN1, X509, dump_publickey

from ..net.names import is_ip
from .credentials import timestamp
from .ossl import subject_oneline

# SAN kinds exported to the application: variable suffix -> cryptography type.
SAN_KINDS = {
    "DNS": x509.DNSName,
    "URI": x509.UniformResourceIdentifier,
    "EMAIL": x509.RFC822Name,
    "IP": x509.IPAddress,
}


@dataclass(frozen=True)
class PeerPolicy:
    """The checks of one context's peers, built once before any connection.

    ``name``: the server name a client checks (a DNS name or an IP literal),
    or None.  The lists are the ``TLS_PEER_*`` values, already validated.
    """

    name: str | None = None
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    spki: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name or self.dns or self.ip:
            # Imported now, before any privilege drop, never mid-handshake.
            import service_identity.cryptography  # noqa: F401

    @property
    def has_lists(self) -> bool:
        return any((self.dns, self.uri, self.email, self.ip, self.spki))

    def check(self, cert: X509) -> str | None:
        """Why ``cert`` (the peer's leaf) is refused, or None if it is admitted."""
        crypto_cert = cert.to_cryptography()
        problem = control_problem(crypto_cert)
        if problem:
            return problem
        if self.name and not _matches_name(crypto_cert, self.name):
            return f"certificate does not match the server name {self.name}"
        if self.has_lists and not self._admits(cert, crypto_cert):
            return f"certificate not admitted by {', '.join(self._list_names())}"
        return None

    def _admits(self, cert: X509, crypto_cert: x509.Certificate) -> bool:
        if self.spki and spki_pin(cert) in self.spki:
            return True
        if any(_matches_name(crypto_cert, name) for name in (*self.dns, *self.ip)):
            return True
        uris = set(san_values(crypto_cert, x509.UniformResourceIdentifier))
        if uris.intersection(self.uri):
            return True
        emails = {_fold_email(e) for e in san_values(crypto_cert, x509.RFC822Name)}
        return bool(emails.intersection(_fold_email(e) for e in self.email))

    def _list_names(self) -> Iterable[str]:
        for name in ("dns", "uri", "email", "ip", "spki"):
            if getattr(self, name):
                yield f"TLS_PEER_{name.upper()}"


def _matches_name(cert: x509.Certificate, name: str) -> bool:
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
        return False
    return True


def _fold_email(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def san_values(cert: x509.Certificate, kind: type) -> list[str]:
    """The subjectAltName values of one kind, as text; [] without the extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(kind)]


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def control_problem(cert: x509.Certificate) -> str | None:
    """Why a string of ``cert`` that reaches the application cannot, or None.

    Subject attributes and subjectAltName values with a control character
    (a NUL included) are refused: they would reach the environment or a log.
    """
    for attribute in cert.subject:
        value = attribute.value
        if isinstance(value, str) and _has_control(value):
            return "certificate subject holds a control character"
    for kind in SAN_KINDS.values():
        if any(_has_control(v) for v in san_values(cert, kind)):
            return "certificate subjectAltName holds a control character"
    return None


def spki_pin(cert: X509) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo (the ``pin-sha256`` form)."""
    der = dump_publickey(FILETYPE_ASN1, cert.get_pubkey())
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def certificate_facts(cert: X509) -> dict[str, str]:
    """The ``SSL_PEER_CERT_*`` variables for the peer certificate ``cert``.

    SAN values are comma-separated; a comma inside a value is written
    ``%2C``, and so that this is unambiguous, a ``%`` is written ``%25``
    (``admin%2Cx.example`` is ``admin%252Cx.example``).
    """
    crypto_cert = cert.to_cryptography()
    facts = {
        "SSL_PEER_CERT_HASH": "SHA256:" + crypto_cert.fingerprint(hashes.SHA256()).hex(),
        "SSL_PEER_CERT_SUBJECT": subject_oneline(cert),
        "SSL_PEER_CERT_SPKI": spki_pin(cert),
        "SSL_PEER_CERT_NOT_AFTER": timestamp(crypto_cert.not_valid_after_utc),
    }
    for suffix, kind in SAN_KINDS.items():
        values = [v.replace("%", "%25").replace(",", "%2C") for v in san_values(crypto_cert, kind)]
        if values:
            facts[f"SSL_PEER_CERT_SAN_{suffix}"] = ",".join(values)
    return facts

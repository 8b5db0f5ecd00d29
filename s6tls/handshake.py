"""The TLS handshake with a deadline, and the facts it establishes.

``handshake`` drives a connection made by ``link.new_connection`` to the end
of its handshake, over a socket or two descriptors alike.  ``connection_facts``
turns the finished connection into the variables s6-networking gives to the
application (``SSL_PROTOCOL``, ``SSL_CIPHER``, ...).
"""

import hashlib
import select
import time

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from .errors import HandshakeError, HandshakeTimeout
from .link import PeerGone, WouldBlock, make_link, ssl_error_text


def handshake(conn: SSL.Connection, rfd: int, wfd: int, timeout_ms: int = 0) -> None:
    """Perform the handshake of ``conn`` (in connect or accept state) on ``rfd``/``wfd``.

    Every check of the peer configured in the context (chain, name) runs
    inside the handshake, so a rejected peer gets an alert, never a Finished.

    Args:
        conn: from ``link.new_connection(ctx, rfd, wfd)``, with
            ``set_accept_state()`` or ``set_connect_state()`` already called.
        timeout_ms: the -K limit; 0 means none.

    Raises:
        HandshakeTimeout: the limit passed (exit 98).
        HandshakeError: the handshake failed, either side rejected the other,
            or the peer closed the connection (exit 97).

    Returns once the handshake is complete and everything it produced has
    been written.  Closes nothing.
    """
    link = make_link(conn, rfd, wfd)
    deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
    poller = select.poll()
    while True:
        wait: WouldBlock | None = None
        try:
            link.call(conn.do_handshake)
        except WouldBlock as wb:
            wait = wb
        except (SSL.ZeroReturnError, PeerGone):
            raise HandshakeError("peer closed the connection during the handshake") from None
        except SSL.SysCallError as exc:
            reason = ssl_error_text(exc)
            raise HandshakeError(f"peer vanished during the handshake: {reason}") from None
        except SSL.Error as exc:
            raise HandshakeError(ssl_error_text(exc)) from None
        try:
            link.flush()
        except WouldBlock as wb:
            wait = wb
        except PeerGone:
            raise HandshakeError("peer closed the connection during the handshake") from None
        if wait is None:
            return
        timeout = None
        if deadline is not None:
            timeout = max(0, int((deadline - time.monotonic()) * 1000))
        poller.register(wait.fd, wait.events)
        ready = poller.poll(timeout)
        poller.unregister(wait.fd)
        if not ready and deadline is not None and time.monotonic() >= deadline:
            raise HandshakeTimeout("handshake timed out")


# OpenSSL's short names where they differ from RFC 4514's, for the one-line form.
_OPENSSL_NAMES = {
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.TITLE: "title",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.USER_ID: "UID",
}


def oneline_name(name: x509.Name) -> str:
    """A distinguished name in OpenSSL's one-line form: ``/CN=x/O=y``, in DER order."""
    parts = []
    for rdn in name.rdns:
        parts.append(
            "+".join(
                f"{_OPENSSL_NAMES.get(a.oid, a.rfc4514_attribute_name)}={a.value!s}" for a in rdn
            )
        )
    return "".join("/" + p for p in parts)


def connection_facts(conn: SSL.Connection) -> dict[str, str]:
    """The SSL_* variables for the application, from a connection after its handshake.

    ``SSL_PROTOCOL`` and ``SSL_CIPHER`` always; ``SSL_TLS_SNI_SERVERNAME``
    when the client sent a server name (server side); ``SSL_PEER_CERT_HASH``
    (``SHA256:`` + hex of the DER) and ``SSL_PEER_CERT_SUBJECT`` when the peer
    sent a certificate.
    """
    facts = {
        "SSL_PROTOCOL": conn.get_protocol_version_name(),
        "SSL_CIPHER": conn.get_cipher_name() or "",
    }
    sni = conn.get_servername()
    if sni:
        facts["SSL_TLS_SNI_SERVERNAME"] = sni.decode("ascii", "replace")
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is not None:
        # Imported here: a server without client certificates never needs it,
        # and s6-tlsd pays every import once per connection.
        from cryptography.hazmat.primitives.serialization import Encoding

        der = cert.public_bytes(Encoding.DER)
        facts["SSL_PEER_CERT_HASH"] = "SHA256:" + hashlib.sha256(der).hexdigest()
        facts["SSL_PEER_CERT_SUBJECT"] = oneline_name(cert.subject)
    return facts

"""The TLS handshake with a deadline, and the facts it establishes.

``handshake`` drives the connection of a link made by ``link.new_link`` to
the end of its handshake, over a socket or two descriptors alike.  ``connection_facts``
turns the finished connection into the variables s6-networking gives to the
application (``SSL_PROTOCOL``, ``SSL_CIPHER``, ...).
"""

import select
import time
from collections.abc import Callable

from OpenSSL import SSL

from ..deadline import after_ms, earliest, wait_ms
from ..errors import HandshakeError, HandshakeTimeout
from ..link import Link, PeerGone, WouldBlock
from .context import VerifyNotes
from .ossl import session_reused
from .peer import certificate_facts
from .reasons import ssl_error_text


def handshake(link: Link, timeout_ms: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
    """Perform the handshake of ``link.conn`` (in connect or accept state).

    Every check of the peer configured in the context (chain, name) runs
    inside the handshake, so a rejected peer gets an alert, never a Finished.

    Args:
        link: from ``link.new_link``, with ``set_accept_state()`` or
            ``set_connect_state()`` already called on its ``conn``.
        timeout_ms: the -K limit; 0 means none.  It is checked before every
            step (one call into OpenSSL, which reads at most what is there,
            or one pipe's worth), so a peer whose bytes never stop coming
            cannot stretch it.  A step also comes at the link's ``wakeup``
            time (a DTLS retransmission).
        clock: the monotonic clock it is measured with (``link.wakeup``'s).

    Raises:
        HandshakeTimeout: the limit passed (exit 98); the message ends with
            the link's ``icmp_news``, if any.
        HandshakeError: the handshake failed, either side rejected the other,
            or the peer closed the connection (exit 97).

    Returns once the handshake is complete and everything it produced has
    been written.  Closes nothing.
    """
    deadline = after_ms(timeout_ms, clock())
    poller = select.poll()
    while True:
        if deadline is not None and clock() >= deadline:
            raise handshake_timeout(link)
        wait = handshake_step(link)
        if wait is None:
            return
        poller.register(wait.fd, wait.events)
        poller.poll(wait_ms(earliest(deadline, link.wakeup()), clock()))
        poller.unregister(wait.fd)


def handshake_timeout(link: Link) -> HandshakeTimeout:
    """The error of a handshake over -K: with what the peer's host said, if it said anything."""
    news = f" (the peer's host said: {link.icmp_news})" if link.icmp_news else ""
    return HandshakeTimeout(f"handshake timed out{news}")


def handshake_step(link: Link) -> WouldBlock | None:
    """One step of the handshake of ``link.conn``, then a flush of what it produced.

    One call into OpenSSL, which reads at most what is there (or one
    pipe's worth).  Returns None once the handshake is complete and written
    out, else the descriptor and events to wait for before the next step
    (which is also due at ``link.wakeup()``, a DTLS retransmission).

    Raises ``HandshakeError`` (97): the handshake failed, either side
    rejected the other, or the peer closed the connection (a write that
    failed is the link's ``failure``).  Closes nothing.
    """
    try:
        return _step(link)
    except (SSL.ZeroReturnError, PeerGone):
        raise HandshakeError("peer closed the connection during the handshake") from None
    except SSL.SysCallError as exc:
        reason = ssl_error_text(exc)
        raise HandshakeError(f"peer vanished during the handshake: {reason}") from None
    except SSL.Error as exc:
        raise HandshakeError(ssl_error_text(exc)) from None


def _step(link: Link) -> WouldBlock | None:
    """One step of the handshake and the flush of what it produced: what to wait for, or None.

    None once the handshake is complete and written out.  Raises what the
    link raises; a write that failed raises its failure (``link.failure``).
    The ``WouldBlock`` returned was never raised: the one caught holds, through
    its traceback, this frame and its caller's, which hold it (a reference
    cycle per connection in a worker, kept until a full collection).
    """
    wait: WouldBlock | None = None
    try:
        link.handshake_step()
    except WouldBlock as wb:
        wait = WouldBlock(wb.fd, wb.events, wb.pending)
    try:
        link.flush()
    except WouldBlock as wb:
        wait = WouldBlock(wb.fd, wb.events, wb.pending)
    except PeerGone:
        if link.failure is not None:
            raise link.failure from None
        raise
    return wait


def connection_facts(conn: SSL.Connection) -> dict[str, str]:
    """The SSL_* variables for the application, from a connection after its handshake.

    ``SSL_PROTOCOL``, ``SSL_CIPHER`` and ``SSL_SESSION_RESUMED`` always;
    ``SSL_TLS_SNI_SERVERNAME`` when a server name was sent (a valid host
    name: the server refuses any other); ``SSL_ALPN_PROTOCOL`` when ALPN
    agreed on one; ``SSL_PSK_IDENTITY`` when a PSK authenticated the
    handshake; the ``SSL_PEER_CERT_*`` variables of ``peer.certificate_facts``
    when the peer has a certificate.
    """
    protocol, cipher = conn.get_protocol_version_name(), conn.get_cipher_name() or ""
    reused = session_reused(conn)
    # An external PSK is a "resumption" under TLS 1.3 and a PSK suite under TLS 1.2.
    psk_used = reused if protocol == "TLSv1.3" else "PSK" in cipher
    notes = conn.get_app_data()
    psk = notes.psk_identity if psk_used and isinstance(notes, VerifyNotes) else None
    facts = {
        "SSL_PROTOCOL": protocol,
        "SSL_CIPHER": cipher,
        "SSL_SESSION_RESUMED": "1" if reused and psk is None else "0",
    }
    sni = conn.get_servername()
    if sni:
        facts["SSL_TLS_SNI_SERVERNAME"] = sni.decode("ascii", "replace")
    alpn = conn.get_alpn_proto_negotiated()
    if alpn:
        facts["SSL_ALPN_PROTOCOL"] = alpn.decode("ascii", "replace")
    if psk is not None:
        facts["SSL_PSK_IDENTITY"] = psk
    cert = conn.get_peer_certificate()
    if cert is not None:
        facts.update(certificate_facts(cert))
    return facts

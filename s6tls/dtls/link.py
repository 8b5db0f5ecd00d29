"""The ciphertext side of a DTLS association: one connected UDP socket.

OpenSSL reads and writes the socket itself (a socket BIO), as
``link.SocketLink`` does for TLS: each read takes one datagram, and OpenSSL
packs a handshake flight into datagrams of at most the MTU, each written on
its own.  Memory BIOs cannot do that: a flight written into one is one
stream of bytes whose datagram boundaries are lost.  They serve only where
a datagram is handed over whole: a server's ``DTLSv1_listen`` on the
ClientHello the listener verified (``cookie``), after which the connection
moves onto its socket (``tls.ossl.use_socket``) with that ClientHello kept.

What OpenSSL's socket BIO gets wrong for UDP is handled here: an empty
datagram reads as an end of file, so that a forged one would end the
association: empty datagrams are taken off the socket before OpenSSL reads
it; and the socket cannot be asked its MTU: it is set (``DTLS_MTU``; the
context has ``OP_NO_QUERY_MTU``).  Once the handshake is done,
``max_datagram`` is the most cleartext one record carries at that MTU.

During the handshake, a flight that got no answer is sent again on the
schedule of ``Retransmission``; ``wakeup`` tells the handshake loop when.
"""

import contextlib
import errno
import socket
import time

from OpenSSL import SSL

from ..link import SocketLink
from ..sizes import RECORD
from ..tls.config import TlsConfig
from ..tls.ossl import use_socket
from . import cookie

_SLACK = 0.05  # seconds: OpenSSL's timer reads rounded (to 0 under 15 ms)


class Retransmission:
    """When the handshake's last flight is sent again: MIN, doubling at each try, up to MAX.

    OpenSSL keeps its own timer (1 s, doubling to 60 s) and retransmits
    whenever it is called after that timer ran out; pyOpenSSL's binding
    cannot replace it.  So s6tls only delays: it calls OpenSSL no sooner than
    its own schedule says, which the configuration keeps at or above
    OpenSSL's (``DTLS_HANDSHAKE_TIMEOUT_MIN`` >= 1000 ms and ``_MAX`` >=
    60000 ms).  A datagram that arrives once OpenSSL's timer ran out may
    still make OpenSSL retransmit at once, which counts as a try.

    ``observe(now, left)`` after every handshake step, with what
    ``DTLSv1_get_timeout`` said; ``retransmitting()`` just before
    ``DTLSv1_handle_timeout``; ``at()`` is when that is due, or None.
    """

    def __init__(self, min_ms: int, max_ms: int) -> None:
        self.first = min_ms / 1000
        self.most = max_ms / 1000
        self.tries = 0  # retransmissions of the current flight
        self.started: float | None = None  # when the current wait began
        self.openssl: float | None = None  # when OpenSSL's own timer runs out
        self._ours = False  # a retransmission was just asked for

    def observe(self, now: float, left: float | None) -> None:
        """After a step: OpenSSL's timer has ``left`` seconds to go (None: none runs)."""
        ours, self._ours = self._ours, False
        if left is None:
            self.started = self.openssl = None
            self.tries = 0
            return
        expiry = now + left
        if self.openssl is not None and abs(expiry - self.openssl) <= _SLACK:
            return  # the same wait
        # OpenSSL began a new wait: a new flight (1 s), or the same one again (doubled).
        self.tries = self.tries + 1 if ours or left > 1 + _SLACK else 0
        self.started = now
        self.openssl = expiry

    def retransmitting(self) -> None:
        """``DTLSv1_handle_timeout`` is about to be called, because ``at()`` passed."""
        self._ours = True

    def at(self) -> float | None:
        """When the last flight is due again (``time.monotonic``), or None."""
        if self.started is None or self.openssl is None:
            return None
        wait = min(self.first * 2**self.tries, self.most)
        return max(self.openssl, self.started + wait)


class DatagramLink(SocketLink):
    """A DTLS association on a connected UDP socket (the record I/O of ``SocketLink``).

    ``hello``: for a server, the ClientHello (with its cookie) the listener
    verified; the handshake starts from it.  None for a client.
    """

    def __init__(
        self, ctx: SSL.Context, fd: int, timer: Retransmission, mtu: int, hello: bytes | None
    ) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.rfd = self.wfd = fd
        self._hello = hello
        self._mtu = mtu
        self.timer = timer
        # A server starts on memory BIOs, for DTLSv1_listen; a client on its socket.
        self.conn = SSL.Connection(ctx, None if hello is not None else self.sock)
        self.conn.set_ciphertext_mtu(mtu)
        self._watch_alerts()

    def handshake_step(self) -> None:
        if self._hello is not None:
            self._listen()
        due = self.timer.at()
        if due is not None and time.monotonic() >= due:
            self.timer.retransmitting()
            self.conn.DTLSv1_handle_timeout()
        self._skip_empty()
        try:
            self._tls(self.conn.do_handshake)
        finally:
            self.timer.observe(time.monotonic(), self.conn.DTLSv1_get_timeout())
        self.max_datagram = min(self.conn.get_cleartext_mtu(), RECORD)

    def _listen(self) -> None:
        """The server's first step: the verified ClientHello, then the socket."""
        hello, self._hello = self._hello, None
        assert hello is not None
        cookie.expect(self.conn, self.sock.getpeername())
        self.conn.bio_write(hello)
        try:
            self.conn.DTLSv1_listen()
        except SSL.WantReadError:  # the cookie went stale (a reload drew a new secret)
            stale = "the ClientHello's cookie is no longer valid"
            raise SSL.Error([("DTLS", "listen", stale)]) from None
        use_socket(self.conn, self.sock)
        self.conn.set_ciphertext_mtu(self._mtu)

    def wakeup(self) -> float | None:
        return None if self.max_datagram is not None else self.timer.at()

    def recv(self, view: memoryview) -> int:
        self._skip_empty()
        return super().recv(view)

    def _skip_empty(self) -> None:
        """Take the empty datagrams at the head of the queue: OpenSSL would read an EOF.

        A pending ICMP error (the peer's port is closed) is raised as the
        ``SysCallError`` OpenSSL would have raised.
        """
        while True:
            try:
                if self.sock.recv(1, socket.MSG_PEEK):
                    return
            except BlockingIOError:
                return
            except OSError as exc:
                code = exc.errno or errno.EIO
                raise SSL.SysCallError(code, errno.errorcode.get(code, "")) from None
            self.sock.recv(1)

    def shut_write(self) -> None:
        """UDP has no half-close: the close_notify was the end of our side."""

    def abandon_write(self) -> None:
        """UDP has no half-close: nothing to shut."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.rfd = self.wfd = -1


def datagram_link(cfg: TlsConfig, ctx: SSL.Context, fd: int, hello: bytes | None) -> DatagramLink:
    """The link of a DTLS association on the connected UDP socket ``fd`` (owned from now on).

    ``hello``: the verified ClientHello, for a server; None for a client.
    Call ``conn.set_accept_state()`` or ``set_connect_state()`` before the
    handshake.
    """
    timer = Retransmission(cfg.dtls_timeout_min, cfg.dtls_timeout_max)
    return DatagramLink(ctx, fd, timer, cfg.dtls_mtu, hello)

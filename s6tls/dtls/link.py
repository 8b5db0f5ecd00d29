"""The ciphertext side of a DTLS association: one connected UDP socket.

OpenSSL works on memory BIOs (as ``link.BioLink``) and this link moves the
datagrams: each datagram read is given to OpenSSL whole, before it is asked
for more; what OpenSSL writes is cut at its records' headers and packed into
datagrams of at most the MTU (``DTLS_MTU``, which the context takes instead
of asking the socket: ``OP_NO_QUERY_MTU``), several records to a datagram
as RFC 6347 4.1.1 allows, a record never split.  A server starts from the
ClientHello the listener verified (``cookie``): ``DTLSv1_listen`` takes it,
and OpenSSL keeps it for the handshake.  Once the handshake is done,
``max_datagram`` is the most cleartext one record carries at that MTU.

OpenSSL never touches the socket itself, because UDP's news is no ending:

* an ICMP error about the peer (its port closed, its host unreachable),
  which a connected UDP socket reports once on its next call, and which
  anyone can forge, is only news: the association goes on, bounded by its
  timeouts (-K, the retransmissions, the idle timeout) and ended by a
  close_notify.  OpenSSL's own socket BIO would take it for a broken
  connection and fail for good;
* an empty datagram, which a socket BIO reads as an end of file, is
  skipped.

During the handshake, a flight that got no answer is sent again on the
schedule of ``Retransmission``; ``wakeup`` tells the handshake loop when.
"""

import errno
import os
import select
import socket
import time
from collections import deque

from OpenSSL import SSL

from ..link import BioLink, WouldBlock, ssl_failure
from ..sizes import RECORD
from ..tls.config import TlsConfig
from ..tls.ossl import pending_output
from . import cookie

_SLACK = 0.05  # seconds: OpenSSL's timer reads rounded (to 0 under 15 ms)
_HEADER = 13  # a DTLS record's header: type, version, epoch, sequence number, length
# What a connected UDP socket reports of an ICMP error about its peer (Linux
# turns destination unreachable, parameter problem and fragmentation needed
# into these): news, not an ending.
ICMP_ERRORS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.EPROTO,
        errno.EMSGSIZE,
    }
)


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


class DatagramLink(BioLink):
    """A DTLS association on the connected UDP socket ``fd``; see the module docstring.

    ``hello``: for a server, the ClientHello (with its cookie) the listener
    verified; the handshake starts from it.  None for a client.  Owns ``fd``.
    """

    def __init__(
        self, ctx: SSL.Context, fd: int, timer: Retransmission, mtu: int, hello: bytes | None
    ) -> None:
        super().__init__(ctx, fd, fd)
        self._hello = hello
        self._mtu = mtu
        self.timer = timer
        self.conn.set_ciphertext_mtu(mtu)
        self._records = bytearray()  # what OpenSSL wrote, not yet cut into datagrams
        self._datagrams: deque[bytes] = deque()  # cut, not yet sent

    def handshake_step(self) -> None:
        if self._hello is not None:
            self._listen()
        due = self.timer.at()
        if due is not None and time.monotonic() >= due:
            self.timer.retransmitting()
            self.conn.DTLSv1_handle_timeout()
        try:
            self._tls(self.conn.do_handshake)
        finally:
            self.timer.observe(time.monotonic(), self.conn.DTLSv1_get_timeout())
        self.max_datagram = min(self.conn.get_cleartext_mtu(), RECORD)

    def _listen(self) -> None:
        """The server's first step: the verified ClientHello."""
        hello, self._hello = self._hello, None
        assert hello is not None
        sock = socket.socket(fileno=self.rfd)
        try:
            cookie.expect(self.conn, sock.getpeername())
        finally:
            sock.detach()
        self.conn.bio_write(hello)
        try:
            self.conn.DTLSv1_listen()
        except SSL.WantReadError:  # the cookie went stale (a reload drew a new secret)
            stale = "the ClientHello's cookie is no longer valid"
            raise SSL.Error([("DTLS", "listen", stale)]) from None

    def wakeup(self) -> float | None:
        return None if self.max_datagram is not None else self.timer.at()

    def _fill(self) -> None:
        """Give OpenSSL the next datagram; an empty one, or an ICMP error, is skipped."""
        try:
            n = self._read()
        except SSL.SysCallError as exc:
            if exc.args[0] not in ICMP_ERRORS:
                raise
            self.icmp_news = exc.args[1]  # consumed: the association goes on
            n = 0
        if not n:
            raise WouldBlock(self.rfd, select.POLLIN)  # poll says at once if more is there
        self.conn.bio_write(self._inbuf[:n])

    def has_output(self) -> bool:
        return bool(self._datagrams) or pending_output(self.conn) > 0

    def _write_out(self) -> None:
        """Send what OpenSSL wrote, as datagrams; see the module docstring.

        A datagram refused for an ICMP error is tried once more (the error
        is consumed by the refusal), then dropped, as UDP may drop any.
        """
        pending = pending_output(self.conn)
        if pending:
            self._records += self.conn.bio_read(pending)
            self._datagrams.extend(_datagrams(self._records, self._mtu))
        while self._datagrams:
            if self.wfd < 0:  # our side is over: what OpenSSL adds goes nowhere
                self._datagrams.clear()
                return
            try:
                self._send(self._datagrams[0])
            except BlockingIOError:
                raise WouldBlock(self.wfd, select.POLLOUT) from None
            except OSError as exc:
                self._failure = ssl_failure(exc)
                self.abandon_write()
                raise self._failure from None
            self._datagrams.popleft()

    def _send(self, datagram: bytes) -> None:
        for _attempt in range(2):  # an ICMP error refuses it once: consumed, tried again
            try:
                os.write(self.wfd, datagram)
                return
            except OSError as exc:
                if exc.errno not in ICMP_ERRORS:
                    raise
                self.icmp_news = exc.strerror
        # refused twice: dropped, as UDP may drop any datagram


def _datagrams(records: bytearray, mtu: int) -> list[bytes]:
    """The whole records at the start of ``records``, taken off it, packed into datagrams.

    In order, as many to a datagram as fit in ``mtu`` bytes (a longer
    record alone); a record never split.
    """
    out: list[bytes] = []
    datagram = bytearray()
    while len(records) >= _HEADER:
        size = _HEADER + int.from_bytes(records[_HEADER - 2 : _HEADER], "big")
        if len(records) < size:
            break
        if datagram and len(datagram) + size > mtu:
            out.append(bytes(datagram))
            datagram.clear()
        datagram += records[:size]
        del records[:size]
    if datagram:
        out.append(bytes(datagram))
    return out


def datagram_link(cfg: TlsConfig, ctx: SSL.Context, fd: int, hello: bytes | None) -> DatagramLink:
    """The link of a DTLS association on the connected UDP socket ``fd`` (owned from now on).

    ``hello``: the verified ClientHello, for a server; None for a client.
    Call ``conn.set_accept_state()`` or ``set_connect_state()`` before the
    handshake.
    """
    timer = Retransmission(cfg.dtls_timeout_min, cfg.dtls_timeout_max)
    return DatagramLink(ctx, fd, timer, cfg.dtls_mtu, hello)

"""The stateless cookie exchange of a DTLS server (RFC 6347 section 4.2.1).

A DTLS server answers a ClientHello that carries no valid cookie with a
HelloVerifyRequest holding one, and remembers nothing: a peer that forges
its source address never gets the answer, so it costs the server no state
and gets no amplification (a HelloVerifyRequest is smaller than the
ClientHello).  Only a ClientHello that comes back with the cookie proves
that its sender receives at the address it claims.

The cookie is an HMAC-SHA256 of the peer's address under a secret drawn
when the context is made, tagged with a generation that changes every
``GENERATION`` seconds; a cookie of this generation or the previous one is
good.  OpenSSL runs the exchange itself (``DTLSv1_listen``): this module
only gives it the cookie callbacks and tells them which address a
connection speaks for (``expect``), since a connection on memory BIOs has no
address of its own.

``verify_hello`` is the listener's side: one datagram from one address in,
what to send back and whether the ClientHello was verified out.  It keeps
no state between datagrams.
"""

import hashlib
import hmac
import os
import time
import weakref
from collections.abc import Callable

from OpenSSL import SSL

GENERATION = 60  # seconds; a cookie is good for one to two of them
_TAG = 16  # bytes of HMAC kept

Address = tuple[str, int]

# The address each connection speaks for, while it is alive.
_EXPECTED: "weakref.WeakKeyDictionary[SSL.Connection, Address]" = weakref.WeakKeyDictionary()


def expect(conn: SSL.Connection, address: Address) -> None:
    """Make the cookie callbacks of ``conn`` work for ``address`` (ip, port)."""
    _EXPECTED[conn] = (address[0], address[1])


class Cookies:
    """The cookie secret of one context, and the callbacks OpenSSL calls.

    ``clock`` is for the tests (default ``time.monotonic``).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = os.urandom(32)
        self._clock = clock

    def install(self, ctx: SSL.Context) -> None:
        """Give ``ctx`` the cookie callbacks (before it makes any connection)."""
        ctx.set_cookie_generate_callback(self._generate)
        ctx.set_cookie_verify_callback(self._verify)

    def make(self, address: Address, generation: int | None = None) -> bytes:
        """The cookie for ``address`` now (or in ``generation``)."""
        if generation is None:
            generation = self._generation()
        tag = bytes([generation % 256])
        text = f"{address[0]} {address[1]}".encode()
        return tag + hmac.new(self._secret, tag + text, hashlib.sha256).digest()[:_TAG]

    def check(self, address: Address, cookie: bytes) -> bool:
        """True if ``cookie`` was made for ``address``, in this generation or the last."""
        now = self._generation()
        return any(hmac.compare_digest(cookie, self.make(address, g)) for g in (now, now - 1))

    def _generation(self) -> int:
        return int(self._clock() // GENERATION)

    def _generate(self, conn: SSL.Connection) -> bytes:
        # No address (a connection nobody called ``expect`` for): a cookie nobody can return.
        address = _EXPECTED.get(conn)
        return self.make(address) if address else os.urandom(1 + _TAG)

    def _verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        address = _EXPECTED.get(conn)
        return address is not None and self.check(address, cookie)


def verify_hello(ctx: SSL.Context, datagram: bytes, address: Address) -> tuple[bytes, bool]:
    """The listener's look at a datagram from an address no child serves.

    Returns (what to send back to ``address``, True if ``datagram`` is a
    ClientHello with a valid cookie).  A ClientHello without one gets a
    HelloVerifyRequest; a verified one gets nothing here (the child that
    serves the peer answers it); anything else gets nothing.  ``ctx`` is a
    DTLS server context with the cookie callbacks (``Cookies.install``);
    OpenSSL reads the datagram through the memory BIO of a connection made
    for it alone, which is then dropped: no state is kept.
    """
    conn = SSL.Connection(ctx, None)
    expect(conn, address)
    conn.bio_write(datagram)
    try:
        conn.DTLSv1_listen()
    except SSL.WantReadError:
        return _pending(conn), False
    except SSL.Error:
        return b"", False
    return b"", True


def _pending(conn: SSL.Connection) -> bytes:
    """What OpenSSL wrote to the memory BIO of ``conn``: one datagram at most."""
    try:
        return conn.bio_read(1 << 16)
    except SSL.WantReadError:
        return b""

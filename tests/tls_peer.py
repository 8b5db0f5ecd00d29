"""A TLS peer the test drives step by step: pyOpenSSL on memory BIOs over a socket or fd.

The test decides every move: when to read, when to stop reading, what to
send (valid records, close_notify, raw bytes that are not TLS at all), and
when to close.  Every wait has a deadline; nothing sleeps.
"""

import contextlib
import errno
import os
import select
import socket
import time

from OpenSSL import SSL


class PeerTimeout(AssertionError):
    """The peer waited longer than its deadline."""


def client_context(cafile: str, max_version: int | None = None) -> SSL.Context:
    """A client context that verifies against ``cafile`` and accepts a bare EOF."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.load_verify_locations(cafile)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    return ctx


def server_context(certfile: str, keyfile: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_chain_file(certfile)
    ctx.use_privatekey_file(keyfile)
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    return ctx


class TlsPeer:
    """One end of a TLS connection, on descriptor ``fd`` (a socket, or a pty in raw mode).

    ``server``: accept instead of connect.  ``wfd``: write there instead of
    ``fd``, which is then only read.  The peer owns its descriptors.
    """

    def __init__(
        self, ctx: SSL.Context, fd: int, *, server: bool = False, wfd: int | None = None
    ) -> None:
        self.fd = fd
        self.wfd = fd if wfd is None else wfd
        for each in {fd, self.wfd}:
            os.set_blocking(each, False)
        self.conn = SSL.Connection(ctx, None)
        if server:
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()
            self.conn.set_tlsext_host_name(b"localhost")
        self.close_notify_seen = False
        self.conn.set_info_callback(self._on_info)
        self.eof = False

    @classmethod
    def on_socket(cls, ctx: SSL.Context, sock: socket.socket, **kw: bool) -> "TlsPeer":
        return cls(ctx, sock.detach(), **kw)

    def _on_info(self, _conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT and ret & 0xFF == 0:
            self.close_notify_seen = True

    # -- raw I/O -----------------------------------------------------------

    def _wait(self, events: int, deadline: float, fd: int | None = None) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout("the peer waited past its deadline")
        poller = select.poll()
        poller.register(self.fd if fd is None else fd, events)
        if not poller.poll(left * 1000):
            raise PeerTimeout("the peer waited past its deadline")

    def write_raw(self, data: bytes, deadline: float) -> None:
        """Write ``data`` as it is, bypassing TLS."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.wfd, view) :]
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline, self.wfd)

    def read_raw(self, deadline: float) -> bytes:
        """Whatever is readable now (waiting for it); b'' at EOF."""
        while True:
            try:
                return os.read(self.fd, 1 << 16)
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)

    def flush(self, deadline: float) -> None:
        """Write out what the TLS object produced."""
        while True:
            try:
                data = self.conn.bio_read(1 << 16)
            except SSL.WantReadError:
                return
            self.write_raw(data, deadline)

    def _feed(self, deadline: float) -> None:
        data = self.read_raw(deadline)
        if data:
            self.conn.bio_write(data)
        else:
            self.eof = True
            self.conn.bio_shutdown()

    # -- TLS ---------------------------------------------------------------

    def handshake(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.conn.do_handshake()
                self.flush(deadline)
                return
            except SSL.WantReadError:
                self.flush(deadline)
                self._feed(deadline)

    def send(self, data: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        self.conn.sendall(data)
        self.flush(deadline)

    def close_notify(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        self.flush(deadline)

    def recv(self, timeout: float = 20) -> bytes:
        """The next decrypted bytes; b'' at the peer's end (see ``close_notify_seen``).

        Raises ``SSL.Error`` for an alert or a bad record.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.conn.recv(1 << 16)
            except SSL.WantReadError:
                self.flush(deadline)
                self._feed(deadline)
            except SSL.ZeroReturnError:
                return b""

    def recv_until_end(self, timeout: float = 30, limit: int | None = None) -> bytes:
        """Everything until the peer's end (or ``limit`` bytes)."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        while limit is None or len(got) < limit:
            chunk = self.recv(max(0.001, deadline - time.monotonic()))
            if not chunk:
                break
            got += chunk
        return bytes(got)

    def close(self) -> None:
        if self.wfd >= 0 and self.wfd != self.fd:
            os.close(self.wfd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self.wfd = -1


def connection_reset(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ECONNRESET

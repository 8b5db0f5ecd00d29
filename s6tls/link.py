"""The ciphertext side of a connection: one socket, or two plain descriptors.

A super-server hands a connection over as two descriptors (0 and 1 from
tcpserver, 6 and 7 from tcpclient) that are usually one socket.  Then the TLS
object works on the socket itself, which is the fast path.  When the two
descriptors really are different files (two pipes, for instance), the TLS
object works on memory BIOs and the link moves ciphertext between them and
the descriptors.

Both links offer the same small interface to the handshake and the engine:
``call`` runs one TLS operation and raises ``WouldBlock(fd, events)`` when it
must wait for a descriptor; ``flush`` writes out ciphertext the TLS object
produced (memory BIOs only); ``close_write`` ends our sending side;
``close`` releases both descriptors.  A send to a peer that closed its input
raises ``PeerGone``.  Nothing here decides *when* to do
what: that is ``pump``'s job.
"""

import contextlib
import errno
import os
import select
import socket
import stat
from collections.abc import Callable
from typing import TypeVar

from OpenSSL import SSL

from .errors import TlsRuntimeError
from .pump import BUFSIZE

T = TypeVar("T")


class PeerGone(Exception):
    """The peer closed its input: nothing we send will ever be read."""


class WouldBlock(Exception):
    """An operation must wait until ``fd`` is ready for ``events`` (poll flags)."""

    def __init__(self, fd: int, events: int) -> None:
        super().__init__(fd, events)
        self.fd = fd
        self.events = events


def same_socket(fd1: int, fd2: int) -> bool:
    """True when both descriptors refer to one and the same socket."""
    st1, st2 = os.fstat(fd1), os.fstat(fd2)
    return stat.S_ISSOCK(st1.st_mode) and (st1.st_dev, st1.st_ino) == (st2.st_dev, st2.st_ino)


def new_connection(ctx: SSL.Context, rfd: int, wfd: int) -> SSL.Connection:
    """Make a TLS connection whose ciphertext goes through ``rfd``/``wfd``.

    When both are one socket, the connection is built on a socket object that
    takes over ``rfd`` (closing it closes ``rfd``); otherwise it uses memory
    BIOs.  Either way both descriptors are made non-blocking.  The caller
    still owns ``wfd`` (and ``rfd`` in the memory BIO case): ``make_link``
    and ``Link.close`` take care of them.
    """
    if same_socket(rfd, wfd):
        sock = socket.socket(fileno=rfd)
        sock.setblocking(False)
        return SSL.Connection(ctx, sock)
    os.set_blocking(rfd, False)
    os.set_blocking(wfd, False)
    return SSL.Connection(ctx, None)


def runtime_error(exc: SSL.Error) -> TlsRuntimeError:
    """A TLS-level failure on an established connection, as a ``TlsRuntimeError``."""
    if isinstance(exc, SSL.SysCallError) or _system_error(exc):
        return TlsRuntimeError(f"connection broken: {ssl_error_text(exc)}")
    return TlsRuntimeError(f"TLS error: {ssl_error_text(exc)}")


def _system_error(exc: SSL.Error) -> bool:
    """True for an ``SSL.Error`` that only reports failed system calls.

    Once a socket call failed (a reset, say), OpenSSL reports the next
    failure as a "system library" entry whose reason text is empty, and
    pyOpenSSL raises it as a plain ``SSL.Error``, without the errno.
    """
    args = exc.args[0] if exc.args else None
    return (
        isinstance(args, list)
        and bool(args)
        and all(isinstance(e, tuple) and e[0] == "system library" and not e[2] for e in args)
    )


def ssl_error_text(exc: SSL.Error) -> str:
    """One line from a pyOpenSSL error: its OpenSSL reasons, or the system error."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        return os.strerror(code) if isinstance(code, int) and code > 0 else "unexpected EOF"
    args = exc.args[0] if exc.args else []
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        text = "; ".join(reason for (_lib, _func, reason) in args if reason)
        if text:
            return text
        return "a system call failed" if _system_error(exc) else "no reason given by OpenSSL"
    if args == []:  # OpenSSL gives no reason once a connection has failed
        return "connection already failed"
    return str(exc) or type(exc).__name__


class Link:
    """What the handshake and the engine need from the ciphertext side."""

    conn: SSL.Connection
    rfd: int
    wfd: int

    def call(self, op: Callable[..., T], *args: object) -> T:
        """Run one TLS operation; raise ``WouldBlock`` if it must wait."""
        raise NotImplementedError

    def has_output(self) -> bool:
        """True when ciphertext is waiting to be written by ``flush``."""
        return False

    def flush(self) -> None:
        """Write out waiting ciphertext; raise ``WouldBlock`` if the fd is full."""

    def close_write(self, close_notify: bool) -> None:
        """Send close_notify if asked, then half-close our write side.

        Raises ``WouldBlock`` if it must wait; call it again then.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Close both descriptors (each once, even if they are one socket)."""
        raise NotImplementedError


class SocketLink(Link):
    """The TLS object reads and writes the socket itself."""

    def __init__(self, conn: SSL.Connection, rfd: int, wfd: int) -> None:
        self.conn = conn
        self.rfd = self.wfd = conn.fileno()
        self._extra_fd = wfd if wfd != self.rfd else -1
        self._notify_sent = False

    def call(self, op: Callable[..., T], *args: object) -> T:
        try:
            return op(*args)
        except SSL.WantReadError:
            raise WouldBlock(self.rfd, select.POLLIN) from None
        except SSL.WantWriteError:
            raise WouldBlock(self.wfd, select.POLLOUT) from None
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == errno.EPIPE:
                raise PeerGone from None
            raise

    def close_write(self, close_notify: bool) -> None:
        if close_notify and not self._notify_sent:
            self.call(self.conn.shutdown)
            self._notify_sent = True
        # ENOTCONN: the peer already reset the connection; nothing left to half-close.
        with contextlib.suppress(OSError):
            self.conn.sock_shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.conn.close()
        if self._extra_fd >= 0:
            os.close(self._extra_fd)
            self._extra_fd = -1


class BioLink(Link):
    """The TLS object works on memory BIOs; this link feeds and drains them."""

    def __init__(self, conn: SSL.Connection, rfd: int, wfd: int) -> None:
        self.conn = conn
        self.rfd = rfd
        self.wfd = wfd
        self._inbuf = memoryview(bytearray(BUFSIZE))
        self._out = memoryview(b"")
        self._eof = False
        self._notify_sent = False

    def call(self, op: Callable[..., T], *args: object) -> T:
        while True:
            try:
                return op(*args)
            except SSL.WantReadError:
                if self._eof:
                    raise
                self._fill()

    def _fill(self) -> None:
        """Move ciphertext from ``rfd`` into the TLS object."""
        try:
            n = os.readv(self.rfd, [self._inbuf])
        except BlockingIOError:
            raise WouldBlock(self.rfd, select.POLLIN) from None
        if n:
            self.conn.bio_write(self._inbuf[:n])
        else:
            self._eof = True
            self.conn.bio_shutdown()

    def has_output(self) -> bool:
        if not self._out:
            try:
                self._out = memoryview(self.conn.bio_read(BUFSIZE))
            except SSL.WantReadError:
                return False
        return True

    def flush(self) -> None:
        while self.has_output():
            if self.wfd < 0:  # our write side is closed: what TLS adds goes nowhere
                self._out = memoryview(b"")
                continue
            try:
                n = os.write(self.wfd, self._out)
            except BlockingIOError:
                raise WouldBlock(self.wfd, select.POLLOUT) from None
            except BrokenPipeError:
                os.close(self.wfd)
                self.wfd = -1
                raise PeerGone from None
            self._out = self._out[n:]

    def close_write(self, close_notify: bool) -> None:
        if close_notify and not self._notify_sent:
            self.conn.shutdown()
            self._notify_sent = True
        self.flush()
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1


def make_link(conn: SSL.Connection, rfd: int, wfd: int) -> Link:
    """The link for a connection made by ``new_connection(ctx, rfd, wfd)``."""
    if same_socket(rfd, wfd) or (rfd == wfd):
        return SocketLink(conn, rfd, wfd)
    return BioLink(conn, rfd, wfd)

"""The ciphertext side of a connection: one socket, or two plain descriptors.

A super-server hands a connection over as two descriptors (0 and 1 from
tcpserver, 6 and 7 from tcpclient) that are usually one socket.  Then the TLS
object works on the socket itself, which is the fast path.  When the two
descriptors are different files (two pipes, a pty, anything that is not one
socket), the TLS object works on memory BIOs and the link moves ciphertext
between them and the descriptors.

``new_link`` builds the one link of a connection; the handshake and the
engine both use it.  Every operation is non-blocking: one that must wait
raises ``WouldBlock(fd, events)``; a send to a peer that reads nothing more
raises ``PeerGone``; a TLS failure raises pyOpenSSL's ``SSL.Error``, and so
does every other failure of the ciphertext descriptors (a reset, EIO): an
``SSL.SysCallError`` with the errno, as OpenSSL reports a socket's, so that
the peer's failures never look like ours.  Nothing here decides *when* to do
what: that is ``lifetime``'s job.
"""

import contextlib
import errno
import os
import select
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from OpenSSL import SSL

from .sizes import BUFSIZE, RECORD
from .tls.ossl import pending_output, recv_into, watch_info

if TYPE_CHECKING:
    from .ktls.keys import HandshakeWatch

T = TypeVar("T")

_ALERT_CLOSE_NOTIFY = 0
_WAITS = (SSL.WantReadError, SSL.WantWriteError, SSL.SysCallError)
_DRAIN_LIMIT = 64  # reads of what is pending when the socket is closed


class PeerGone(Exception):
    """The peer closed its input: nothing we send will ever be read."""


class WouldBlock(Exception):
    """An operation must wait until ``fd`` is ready for ``events`` (poll flags).

    ``pending`` is True when a TLS write was started: it must be retried with
    the same data before anything else is sent.
    """

    def __init__(self, fd: int, events: int, pending: bool = False) -> None:
        super().__init__(fd, events)
        self.fd = fd
        self.events = events
        self.pending = pending


def poll_now(fd: int, events: int) -> int:
    """What ``fd`` is ready for now, without waiting: its poll ``revents``, 0 for nothing.

    Among ``events`` (poll flags), and POLLERR, POLLHUP, POLLNVAL, which poll
    always reports.
    """
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


def same_socket(fd1: int, fd2: int) -> bool:
    """True when both descriptors refer to one and the same socket."""
    st1 = os.fstat(fd1)
    if not stat.S_ISSOCK(st1.st_mode):
        return False
    st2 = st1 if fd1 == fd2 else os.fstat(fd2)
    return (st1.st_dev, st1.st_ino) == (st2.st_dev, st2.st_ino)


def new_link(ctx: SSL.Context, rfd: int, wfd: int, sock: socket.socket | None = None) -> "Link":
    """The link, and its TLS connection, for ciphertext on ``rfd``/``wfd``.

    The link takes ownership of both descriptors (``Link.close`` closes each
    once, even when they are one socket or one file) and makes them
    non-blocking.  ``sock``, if given, is the socket object of ``rfd`` and
    ``wfd``, which are then one socket (a server that accepted it has one:
    the link takes it instead of making another).  Call
    ``link.conn.set_accept_state()`` or ``set_connect_state()`` before the
    handshake.
    """
    if sock is not None or same_socket(rfd, wfd):
        return SocketLink(ctx, rfd, wfd, sock)
    return BioLink(ctx, rfd, wfd)


class InfoWatch:
    """What a connection's info events tell (``ossl.watch_info``); held by its link.

    ``close_notify`` becomes True when the peer's close_notify alert is
    read.  ``handshake`` (kernel TLS: ``ktls.keys.HandshakeWatch``), if set
    before the handshake, is fed every event; without it, only the alerts
    are watched.  It holds no reference to the link or the connection, so a
    finished connection is freed at once (a long-lived worker would keep a
    cycle until a full collection).
    """

    __slots__ = ("__weakref__", "close_notify", "handshake")

    def __init__(self) -> None:
        self.close_notify = False
        self.handshake: HandshakeWatch | None = None

    def on_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        # SSL_CB_READ_ALERT is two bits (alert | read): testing either one
        # alone would also count the close_notify we send ourselves under -S.
        read_alert = where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT
        if read_alert and ret & 0xFF == _ALERT_CLOSE_NOTIFY:
            self.close_notify = True
        if self.handshake is not None:
            self.handshake.on_info(conn, where, ret)


class Link:
    """What the handshake and the engine need from the ciphertext side.

    ``close_notify_received`` becomes True when the peer's close_notify
    alert was read (``recv`` returns 0 for it and for a bare EOF alike).
    ``handshake_watch``, for kernel TLS, is set before the handshake.
    ``max_datagram`` is set by a datagram link (DTLS) once its handshake is
    done: the most cleartext one datagram carries; the engine then runs in
    datagram mode.  ``icmp_news`` is the text of the last ICMP error a
    datagram link was told about its peer (which is no ending), for the
    message of a handshake that then times out.
    """

    conn: SSL.Connection
    rfd: int
    wfd: int
    info: InfoWatch
    max_datagram: int | None = None
    icmp_news: str | None = None

    def _watch_alerts(self) -> None:
        """Watch the connection's alerts (``InfoWatch``)."""
        self.info = InfoWatch()
        watch_info(self.conn, self.info, alerts_only=True)

    @property
    def close_notify_received(self) -> bool:
        """True once the peer's close_notify was read."""
        return self.info.close_notify

    @property
    def handshake_watch(self) -> "HandshakeWatch | None":
        """Kernel TLS's watch of the handshake, fed by the info callback; None if unset."""
        return self.info.handshake

    @handshake_watch.setter
    def handshake_watch(self, watch: "HandshakeWatch | None") -> None:
        self.info.handshake = watch
        watch_info(self.conn, self.info, alerts_only=watch is None)

    def handshake_step(self) -> None:
        """Advance the handshake; return once it is complete.

        What it produced may still have to be written out: call ``flush``
        after it, whether it returned or raised ``WouldBlock``.
        """
        self._tls(self.conn.do_handshake)

    def wakeup(self) -> float | None:
        """When (``time.monotonic``) ``handshake_step`` must be called even if nothing arrived.

        None: only when its descriptor is ready.  A datagram link retransmits then.
        """
        return None

    def recv(self, view: memoryview) -> int:
        """Decrypt at most one record into ``view``; 0 at the peer's end."""
        raise NotImplementedError

    def send(self, view: memoryview) -> int:
        """Encrypt and send a prefix of ``view``; return its length."""
        raise NotImplementedError

    def notify(self) -> None:
        """Send our close_notify (and write it out)."""
        raise NotImplementedError

    def has_output(self) -> bool:
        """True when ciphertext is waiting for ``flush`` (memory BIOs only)."""
        return False

    def flush(self) -> None:
        """Write out ciphertext the TLS object produced (memory BIOs only).

        Raises ``WouldBlock`` and ``PeerGone`` only: a write that fails
        otherwise (a reset, EIO) raises ``PeerGone`` too, since our write
        side is over, and keeps the failure in ``failure``.
        """

    @property
    def failure(self) -> SSL.Error | None:
        """The failure of a write ``flush`` ended with; every later TLS operation raises it."""
        return None

    def shut_write(self) -> None:
        """Flush what TLS produced, then shut our write side (TCP half-close)."""
        raise NotImplementedError

    def abandon_write(self) -> None:
        """Shut our write side now, dropping whatever is not written yet."""
        raise NotImplementedError

    def close(self) -> None:
        """Close both descriptors, once each.

        The write side is shut first, and what the peer sent that nobody
        read is read and dropped (without waiting), so that a pending alert
        or record of ours is followed by a FIN rather than destroyed by the
        RST a socket closed with unread data sends.
        """
        raise NotImplementedError

    def _tls(self, op: Callable[..., T], *args: object) -> T:
        raise NotImplementedError


class SocketLink(Link):
    """The TLS object reads and writes the socket itself (``sock``: its object, if made)."""

    def __init__(
        self, ctx: SSL.Context, rfd: int, wfd: int, sock: socket.socket | None = None
    ) -> None:
        self.sock = sock if sock is not None else socket.socket(fileno=rfd)
        self.sock.setblocking(False)
        self.conn = SSL.Connection(ctx, self.sock)
        self._watch_alerts()
        self.rfd = self.wfd = rfd
        self._extra_fd = wfd if wfd != rfd else -1
        self._write_shut = False

    def _tls(self, op: Callable[..., T], *args: object) -> T:
        try:
            return op(*args)
        except _WAITS as exc:
            raise self._translated(exc) from None

    def _translated(self, exc: SSL.Error, pending: bool = False) -> Exception:
        """What a pyOpenSSL exception means here: wait for a descriptor, the peer
        hung up (EPIPE), or the exception itself."""
        if isinstance(exc, SSL.WantReadError):
            return WouldBlock(self.rfd, select.POLLIN, pending)
        if isinstance(exc, SSL.WantWriteError):
            return WouldBlock(self.wfd, select.POLLOUT, pending)
        if exc.args and exc.args[0] == errno.EPIPE:
            return PeerGone()
        return exc

    def recv(self, view: memoryview) -> int:
        try:
            return recv_into(self.conn, view, RECORD)
        except SSL.ZeroReturnError:
            return 0
        except _WAITS as exc:
            raise self._translated(exc) from None

    def send(self, view: memoryview) -> int:
        try:
            return self.conn.send(view)
        except _WAITS as exc:  # waiting leaves a record half-written in OpenSSL
            raise self._translated(exc, pending=True) from None

    def notify(self) -> None:
        self._tls(self.conn.shutdown)

    def shut_write(self) -> None:
        self.abandon_write()

    def abandon_write(self) -> None:
        if not self._write_shut:
            self._write_shut = True
            # ENOTCONN: the peer already reset the connection; nothing to half-close.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self.rfd < 0:
            return
        self.abandon_write()
        with contextlib.suppress(OSError):
            for _ in range(_DRAIN_LIMIT):
                if not self.sock.recv(BUFSIZE):
                    break
        self.sock.close()
        if self._extra_fd >= 0:
            os.close(self._extra_fd)
        self.rfd = self.wfd = self._extra_fd = -1


class BioLink(Link):
    """The TLS object works on memory BIOs; this link feeds and drains them."""

    def __init__(self, ctx: SSL.Context, rfd: int, wfd: int) -> None:
        self.conn = SSL.Connection(ctx, None)
        self._watch_alerts()
        self.rfd = rfd
        self.wfd = wfd
        for fd in {rfd, wfd}:
            os.set_blocking(fd, False)
        self._inbuf = memoryview(bytearray(BUFSIZE))
        self._out = memoryview(b"")
        self._eof = False
        self._notify_sent = False
        self._failure: SSL.SysCallError | None = None

    @property
    def failure(self) -> SSL.Error | None:
        return self._failure

    def _tls(self, op: Callable[..., T], *args: object) -> T:
        """``op`` with at most one read of ``rfd`` in between two tries.

        So one call does a bounded amount of work even against a peer whose
        bytes never stop coming: the caller gets ``WouldBlock`` back, and
        checks its deadlines, between two reads.  A failure of a write
        (``failure``) is raised first.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return op(*args)
        except SSL.WantReadError:
            if self._eof:
                raise
        self._fill()
        try:
            return op(*args)
        except SSL.WantReadError:
            if self._eof:
                raise
            raise WouldBlock(self.rfd, select.POLLIN) from None

    def _fill(self) -> None:
        """Move ciphertext from ``rfd`` into the TLS object."""
        n = self._read()
        if n:
            self.conn.bio_write(self._inbuf[:n])
        else:
            self._eof = True
            self.conn.bio_shutdown()

    def _read(self) -> int:
        """Read ``rfd`` once into the input buffer; return how much.

        Raises ``WouldBlock`` when nothing is there, and any other failure
        as its ``SSL.SysCallError`` (``ssl_failure``).
        """
        try:
            return os.readv(self.rfd, [self._inbuf])
        except BlockingIOError:
            raise WouldBlock(self.rfd, select.POLLIN) from None
        except OSError as exc:
            raise ssl_failure(exc) from None

    def recv(self, view: memoryview) -> int:
        try:
            return self._tls(recv_into, self.conn, view, RECORD)
        except SSL.ZeroReturnError:
            return 0

    def send(self, view: memoryview) -> int:
        # Backpressure: encrypt more only once the last record is out.  One
        # record at a time, so that one bio_read takes all of it; written at
        # once, so that a failure to write it is this send's.
        self._write_out()
        n = self._tls(self.conn.send, view[:RECORD])
        with contextlib.suppress(WouldBlock):  # the loop's flush finishes it
            self._write_out()
        return n

    def notify(self) -> None:
        if not self._notify_sent:  # a second SSL_shutdown would read the peer
            self.conn.shutdown()
            self._notify_sent = True
        self._write_out()

    def has_output(self) -> bool:
        return bool(self._out) or pending_output(self.conn) > 0

    def flush(self) -> None:
        try:
            self._write_out()
        except SSL.SysCallError:  # our write side is over; the next TLS operation raises it
            raise PeerGone from None

    def _write_out(self) -> None:
        """``flush``, except that a failed write raises its ``SSL.SysCallError``.

        Any failure but EPIPE (a reset, EIO) also ends our write side and
        stays in ``failure``.
        """
        while self._out or pending_output(self.conn):
            if not self._out:
                self._out = memoryview(self.conn.bio_read(BUFSIZE))
            if self.wfd < 0:  # our write side is closed: what TLS adds goes nowhere
                self._out = memoryview(b"")
                continue
            try:
                n = os.write(self.wfd, self._out)
            except BlockingIOError:
                raise WouldBlock(self.wfd, select.POLLOUT) from None
            except BrokenPipeError:
                self._out = memoryview(b"")
                self.abandon_write()
                raise PeerGone from None
            except OSError as exc:
                self._failure = ssl_failure(exc)
                self.abandon_write()
                raise self._failure from None
            self._out = self._out[n:]

    def shut_write(self) -> None:
        self.flush()
        self.abandon_write()

    def abandon_write(self) -> None:
        self._out = memoryview(b"")
        if self.wfd >= 0:
            if self.wfd != self.rfd:
                os.close(self.wfd)
            self.wfd = -1

    def close(self) -> None:
        with contextlib.suppress(WouldBlock, PeerGone, OSError):
            self.flush()
        self.abandon_write()
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1


def ssl_failure(exc: OSError) -> SSL.SysCallError:
    """A failure of a ciphertext descriptor, as OpenSSL reports one on a socket (the errno)."""
    return SSL.SysCallError(exc.errno, exc.strerror)

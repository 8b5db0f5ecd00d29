"""The full-duplex pump between an application and a TLS peer: libstls's stls_run.

``run`` is the thin I/O loop around ``pump.Pump``: it performs the operations
the pump asks for, reads until a descriptor would block, then sleeps in one
``poll`` on exactly the descriptors some operation waits for, plus the
selfpipe.  It knows nothing of command lines, the environment or exit codes.
"""

import os
import select
import time
from collections.abc import Callable

from OpenSSL import SSL

from .link import Link, PeerGone, WouldBlock, make_link, runtime_error
from .pump import LINGER, Pump, Stats

_ALERT_CLOSE_NOTIFY = 0
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


def run(
    conn: SSL.Connection,
    fds: tuple[int, int, int, int, int],
    pid: int | None = None,
    *,
    close_notify: bool = False,
    strict_close_notify: bool = False,
    idle_timeout: float | None = None,
    stats: Stats | None = None,
) -> int | None:
    """Pump data both ways between an application and a TLS peer until the end.

    Args:
        conn: a connection made by ``link.new_connection`` on ``fds[2]`` and
            ``fds[3]``, whose handshake is done.
        fds: cleartext read (from the application), cleartext write (to the
            application), ciphertext read, ciphertext write, selfpipe read end
            (a ``selfpipe.SelfPipe`` delivering at least SIGCHLD).  The two
            ciphertext fds may be one socket or two other files.
        pid: the application's pid, reaped here on SIGCHLD; ``None`` if there is
            no child to watch.
        close_notify: -S: on application EOF send close_notify before the TCP
            half-close (-s, the default, only half-closes).
        strict_close_notify: -J: a peer EOF without close_notify is an error
            (-j, the default, takes it as a plain EOF).
        idle_timeout: seconds without application data in either direction
            after which both directions are closed; ``None`` for no limit.
        stats: if given, filled with the byte counts and how the tunnel ended.

    Returns:
        the application's wait status if it died before the end (everything
        it wrote was delivered before the connection was closed); otherwise
        ``None``: both directions closed cleanly (or idled out) while the
        application was alive, or its death was not yet reported, and the
        caller waits for it.

    Raises:
        TlsRuntimeError: a TLS alert or bad record, a broken connection, or a
            truncation under -J.
        OSError: a system call on a cleartext fd failed.

    ``run`` owns the four data descriptors and closes every one of them before
    it returns or raises; it leaves the selfpipe open.  It never exits the
    process and never waits for a child other than ``pid``.
    """
    cread, cwrite, nread, nwrite, selfpipe = fds
    link = make_link(conn, nread, nwrite)
    open_fds = {cread, cwrite}
    stats = stats if stats is not None else Stats()
    pump = Pump(
        close_notify=close_notify,
        strict_close_notify=strict_close_notify,
        tls12=conn.get_protocol_version_name() != "TLSv1.3",
    )
    try:
        os.set_blocking(cread, False)
        os.set_blocking(cwrite, False)
        loop = _Loop(conn, link, cread, cwrite, selfpipe, pid, idle_timeout, open_fds, stats)
        return loop.run(pump)
    finally:
        stats.describe_ending(pump)
        for fd in open_fds:
            os.close(fd)
        link.close()


class _Loop:
    """One run of the poll loop; each ``_op_*`` method performs one operation."""

    def __init__(
        self,
        conn: SSL.Connection,
        link: Link,
        cread: int,
        cwrite: int,
        selfpipe: int,
        pid: int | None,
        idle_timeout: float | None,
        open_fds: set[int],
        stats: Stats,
    ) -> None:
        self.stats = stats
        self.conn = conn
        self.link = link
        self.cread = cread
        self.cwrite = cwrite
        self.selfpipe = selfpipe
        self.pid = pid
        self.idle_timeout = idle_timeout
        self.open_fds = open_fds
        self.close_notify_seen = False
        # operation name -> (fd, poll events) it is waiting for
        self.blocked: dict[str, tuple[int, int]] = {}

    def _on_info(self, _conn: SSL.Connection, where: int, ret: int) -> None:
        # SSL_CB_READ_ALERT is two bits (alert | read): testing either one
        # alone would also count the close_notify we send ourselves under -S.
        if (
            where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT
            and ret & 0xFF == _ALERT_CLOSE_NOTIFY
        ):
            self.close_notify_seen = True

    def run(self, pump: Pump) -> int | None:
        # A bare EOF must not be an OpenSSL error (it would send an alert and
        # kill the other direction); -J is enforced by the pump instead.
        self.conn.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
        self.conn.set_info_callback(self._on_info)
        ops: list[tuple[str, Callable[[], bool], Callable[[Pump], None]]] = [
            ("app_read", pump.want_app_read, self._op_app_read),
            ("peer_send", pump.want_peer_send, self._op_peer_send),
            ("out_close", pump.want_out_close, self._op_out_close),
            ("peer_recv", pump.want_peer_recv, self._op_peer_recv),
            ("app_write", pump.want_app_write, self._op_app_write),
            ("in_close", pump.want_in_close, self._op_in_close),
        ]
        poller = select.poll()
        registered: dict[int, int] = {}
        self.last_activity = time.monotonic()
        self._reap(pump)
        while True:
            progress = True
            while progress:
                progress = False
                for name, wanted, op in ops:
                    if name not in self.blocked and wanted():
                        progress |= self._perform(name, op, pump)
                if self.link.has_output() and "flush" not in self.blocked:
                    progress |= self._perform("flush", lambda _pump: self.link.flush(), pump)
            if pump.done():
                self._reap(pump)  # it may have died just now: report it if so
                return pump.app_status
            # Forget waits of operations that are no longer wanted.
            for name, wanted, _op in ops:
                if name in self.blocked and not wanted():
                    del self.blocked[name]
            wanted_events = {self.selfpipe: select.POLLIN}
            for fd, events in self.blocked.values():
                wanted_events[fd] = wanted_events.get(fd, 0) | events
            for fd in registered.keys() - wanted_events.keys():
                poller.unregister(fd)
            for fd, events in wanted_events.items():
                if registered.get(fd) != events:
                    poller.register(fd, events)
            registered = wanted_events
            ready = dict(poller.poll(self._poll_timeout_ms(pump)))
            if not ready:
                if pump.lingering():
                    pump.on_linger_end()
                elif self.idle_timeout is not None and self._idle_left() <= 0:
                    pump.on_idle()
                    self.blocked.clear()
                continue
            if self.selfpipe in ready:
                self._reap(pump)
            for name, (fd, events) in list(self.blocked.items()):
                if ready.get(fd, 0) & (events | _HANGUP):
                    del self.blocked[name]

    def _perform(self, name: str, op: Callable[[Pump], None], pump: Pump) -> bool:
        """Run one operation; False if it must wait (it is then in ``blocked``)."""
        try:
            op(pump)
        except WouldBlock as wb:
            self.blocked[name] = (wb.fd, wb.events)
            return False
        except PeerGone:
            pump.on_peer_gone()
            self._close_fd(self.cread)
        return True

    # -- timing ----------------------------------------------------------

    def _idle_left(self) -> float:
        assert self.idle_timeout is not None
        return self.last_activity + self.idle_timeout - time.monotonic()

    def _poll_timeout_ms(self, pump: Pump) -> int | None:
        if pump.lingering():
            return int(LINGER * 1000)
        if self.idle_timeout is None:
            return None
        return max(0, int(self._idle_left() * 1000) + 1)

    # -- the application -------------------------------------------------

    def _reap(self, pump: Pump) -> None:
        """Read the selfpipe; if the application died, tell the pump."""
        _drain(self.selfpipe)
        if self.pid is None or pump.app_status is not None:
            return
        got, status = os.waitpid(self.pid, os.WNOHANG)
        if got == self.pid:
            pump.on_app_exit(status)
            self.blocked.pop("app_write", None)
            self.blocked.pop("app_read", None)  # drain what it left, then EOF
            self._close_fd(self.cwrite)

    def _await_exit(self, pump: Pump, timeout: float) -> None:
        """Give the application up to ``timeout`` seconds to die, and reap it."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.selfpipe, select.POLLIN)
        self._reap(pump)
        while pump.app_status is None and self.pid is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                return
            self._reap(pump)

    def _close_fd(self, fd: int) -> None:
        if fd in self.open_fds:
            self.open_fds.discard(fd)
            os.close(fd)

    def _op_app_read(self, pump: Pump) -> None:
        try:
            n = os.readv(self.cread, [pump.outbound.space()])
        except BlockingIOError:
            if pump.app_status is None:
                raise WouldBlock(self.cread, select.POLLIN) from None
            n = 0  # the application is dead: what is not in the pipe now never comes
        if n:
            pump.outbound.produced(n)
            self.last_activity = time.monotonic()
        else:
            pump.on_app_eof()

    def _op_app_write(self, pump: Pump) -> None:
        try:
            n = os.write(self.cwrite, pump.inbound.data())
        except BlockingIOError:
            raise WouldBlock(self.cwrite, select.POLLOUT) from None
        except BrokenPipeError:
            pump.on_app_gone()
            self._close_fd(self.cwrite)
            return
        pump.inbound.consumed(n)
        self.stats.to_app += n
        self.last_activity = time.monotonic()

    def _op_in_close(self, pump: Pump) -> None:
        self._close_fd(self.cwrite)
        pump.on_in_closed()

    # -- the peer --------------------------------------------------------

    def _op_peer_send(self, pump: Pump) -> None:
        # Backpressure on a memory BIO: encrypt more only once the last is out.
        self.link.flush()
        try:
            n = self.link.call(self.conn.send, pump.outbound.data())
        except SSL.Error as exc:
            raise runtime_error(exc) from None
        pump.outbound.consumed(n)
        self.stats.to_peer += n

    def _op_peer_recv(self, pump: Pump) -> None:
        try:
            n = self.link.call(self.conn.recv_into, pump.inbound.space())
        except SSL.ZeroReturnError:
            n = 0
        except SSL.Error as exc:
            # Once the application ended its output and all of it went out, a
            # peer may answer our bare EOF with an alert: if the application
            # exits by itself, this is only the end of the linger.  Its input
            # stays open meanwhile: one that still reads must not be handed a
            # clean EOF after a reset or a bad record (the error stands, 98).
            if pump.app_eof and pump.out_closed:
                self._await_exit(pump, LINGER)
            if pump.lingering():
                pump.on_linger_end()
                return
            raise runtime_error(exc) from None
        if n:
            pump.on_peer_data(n)
        else:
            pump.on_peer_eof(self.close_notify_seen)

    def _op_out_close(self, pump: Pump) -> None:
        try:
            self.link.close_write(pump.close_notify)
        except SSL.Error as exc:
            raise runtime_error(exc) from None
        pump.on_out_closed()
        self._close_fd(self.cread)


def _drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 256):
            pass
    except BlockingIOError:
        pass

"""The full-duplex pump between an application and a TLS peer: libstls's stls_run.

``run`` is the thin I/O loop around ``lifetime.Lifetime``: it performs the
operations the machine wants, feeds back what each one found, and sleeps in
one ``poll`` per wake-up, on exactly the descriptors some operation waits
for plus the selfpipe, until the machine's next deadline.  It decides
nothing itself, and knows nothing of command lines, the environment or exit
codes.
"""

import contextlib
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from OpenSSL import SSL

from .deadline import wait_ms
from .errors import TlsRuntimeError
from .lifetime import DATA_OPS, In, Lifetime, Op, Out, Stats
from .link import Link, PeerGone, WouldBlock, poll_now
from .selfpipe import read_signals
from .tls.reasons import error_reason

if TYPE_CHECKING:
    from .ktls.path import KernelPath

_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
_PEER_SHUT = select.POLLRDHUP | select.POLLHUP  # a socket whose other end shut its output
_PASSES = 16  # passes over the operations between two looks at the selfpipe
_FLUSH = "flush"  # the link's own operation: write out what TLS produced


def run(
    link: Link,
    fds: tuple[int, int, int],
    pid: int | None = None,
    *,
    close_notify: bool = False,
    strict_close_notify: bool = False,
    idle_timeout: float | None = None,
    stats: Stats | None = None,
    ktls: bool = False,
) -> int | None:
    """Pump data both ways between an application and a TLS peer until the end.

    Args:
        link: from ``link.new_link``, whose handshake is done.
        fds: cleartext read (the application's output), cleartext write (its
            input), and the read end of a selfpipe (``selfpipe.SelfPipe``)
            delivering at least SIGCHLD, and whichever other signals are to
            be passed on to the application.  The two cleartext descriptors
            may be one socket (a socketpair's end): each direction is then
            ended with ``shutdown`` and the socket closed once both are.
        pid: the application's pid, reaped here; ``None`` if there is no
            child to watch.
        close_notify: -S: on application EOF send close_notify before the TCP
            half-close (-s, the default, only half-closes).
        strict_close_notify: -J: a peer EOF without close_notify is an error
            (-j, the default, takes it as a plain EOF).
        idle_timeout: seconds without application data in either direction
            after which the tunnel is closed; ``None`` for no limit.
        stats: if given, filled with the byte counts, how the tunnel ended
            and which path carried the data (``Stats.path``).
        ktls: hand the record layer to the kernel (kernel TLS) and splice the
            data between the two cleartext pipes and the socket.  Needs a
            link on one TCP socket whose ``handshake_watch`` saw the
            handshake, on a context made with ``ktls.keys.watch_context``;
            otherwise, or when the kernel refuses (no ``tls`` module, a
            suite it lacks, a ``setsockopt`` that fails), the data goes
            through userspace and ``Stats.path`` says why.  If the kernel
            takes the send key and refuses the receive key, the tunnel ends
            as after a TLS error (98): it is never half in the kernel.

    Returns:
        the application's wait status, once it exited (``run`` waits for it,
        passing on every signal other than SIGCHLD that the selfpipe
        delivers); ``None`` when there is no application.  Without an
        application, a signal ends the tunnel at once and its number is
        returned, the wait status of a process killed by it.

    Raises:
        TlsRuntimeError: a TLS alert or bad record, a broken connection, or a
            truncation under -J; raised only once the application is gone
            (it is given ``lifetime.GRACE`` seconds, then SIGTERM, then
            SIGKILL).
        OSError: a system call on a cleartext fd failed.

    ``run`` owns the link and the two cleartext descriptors and closes every
    one of them before it returns or raises; it leaves the selfpipe open.
    It never exits the process and never waits for a child other than ``pid``.
    The rules it follows are ``lifetime``'s.

    A link whose ``max_datagram`` is set (DTLS) runs the machine in datagram
    mode: the cleartext socket carries one datagram per message, a datagram
    larger than ``max_datagram`` is dropped and counted (``Stats.refused``),
    an empty one is not carried, and every close is a close_notify.
    """
    cread, cwrite, selfpipe = fds
    link.conn.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)  # -J is the machine's
    machine = Lifetime(
        close_notify=close_notify,
        strict_close_notify=strict_close_notify,
        tls12=link.conn.get_protocol_version_name() != "TLSv1.3",
        app=pid is not None,
        idle_timeout=idle_timeout,
        now=time.monotonic(),
        stats=stats,
        max_datagram=link.max_datagram,
    )
    path = _kernel_path(link, (cread, cwrite), machine) if ktls else None
    if path is None:
        loop = _Loop(machine, link, cread, cwrite, selfpipe, pid)
    else:
        loop = _KernelLoop(machine, path, cread, cwrite, selfpipe, pid)
    try:
        os.set_blocking(cread, False)
        os.set_blocking(cwrite, False)
        loop.run()
    except BaseException:
        loop.abort()
        raise
    return machine.result()


def _kernel_path(link: Link, app: tuple[int, int], machine: Lifetime) -> "KernelPath | None":
    """The kernel path for ``link``, or None: ``machine.stats.path`` says which, and why.

    ``app`` are the application's descriptors: pipes, or splice cannot
    move the data.  When the kernel took one direction only, the machine
    is told that the connection failed (98).
    """
    from .ktls.path import HalfInstalled, take_over  # only then: it costs start-up time

    stats = machine.stats

    if not all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in app):
        stats.path = "userspace (kernel TLS: the application's descriptors are not pipes)"
        return None
    try:
        path = take_over(link.conn, link.rfd, link.wfd, link.handshake_watch, link)
    except HalfInstalled as exc:
        stats.path = "none"
        machine.send_failed(str(exc))
        return None
    if isinstance(path, str):
        stats.path = f"userspace (kernel TLS: {path})"
        return None
    stats.path = f"kernel TLS {path.describe}"
    return path


class _Loop:
    """One run of the poll loop; each ``_op_*`` method performs one operation.

    An operation reports what it found to the machine, or raises
    ``WouldBlock`` if it must wait for a descriptor; the loop then polls.
    """

    def __init__(
        self, machine: Lifetime, link: Link, cread: int, cwrite: int, selfpipe: int, pid: int | None
    ) -> None:
        self.m = machine
        self.link = link
        self.cread = cread
        self.cwrite = cwrite
        self.selfpipe = selfpipe
        self.pid = pid
        self.perform: dict[Op, Callable[[], None]] = {
            Op.READ_APP: self._op_read_app,
            Op.SEND: self._op_send,
            Op.NOTIFY: self._op_notify,
            Op.SHUT_WRITE: self._op_shut_write,
            Op.ABANDON_WRITE: self._op_abandon_write,
            Op.CLOSE_APP_OUTPUT: self._op_close_app_output,
            Op.RECV: self._op_recv,
            Op.WRITE_APP: self._op_write_app,
            Op.CLOSE_APP_INPUT: self._op_close_app_input,
            Op.CLOSE_NET: self._op_close_net,
            Op.SIGNAL_APP: self._op_signal_app,
        }
        # One socket for both directions of the application: shut each, close once.
        self.app_sock = socket.socket(fileno=cread) if cread == cwrite else None
        if machine.datagram:
            self.perform[Op.READ_APP] = self._op_read_datagram
        self.data_plan = [(op, self.perform[op]) for op in DATA_OPS]
        self.blocked: dict[object, tuple[int, int]] = {}  # operation -> (fd, poll events)
        self.poller = select.poll()
        self.registered: dict[int, int] = {}

    def run(self) -> None:
        """Perform operations until the machine is finished."""
        m = self.m
        self._read_selfpipe()
        while not m.finished:
            progress = True
            passes = 0
            while progress and passes < _PASSES:
                progress = self._pass()
                m.tick(time.monotonic())
                passes += 1
            if not m.finished:
                self._sleep(0 if progress else self._timeout_ms())

    def _pass(self) -> bool:
        """Try each wanted operation once; True if any of them did something."""
        m, blocked = self.m, self.blocked
        progress = False
        for op, perform in self.data_plan:
            if op not in blocked and m.wants(op):
                try:
                    perform()
                    progress = True
                except WouldBlock as wb:
                    blocked[op] = (wb.fd, wb.events)
        for op in m.control_ops():
            if op not in blocked and m.wants(op):
                try:
                    self.perform[op]()
                    progress = True
                except WouldBlock as wb:
                    blocked[op] = (wb.fd, wb.events)
        if _FLUSH not in blocked and self.link.has_output():
            try:
                self.link.flush()
            except WouldBlock as wb:
                blocked[_FLUSH] = (wb.fd, wb.events)
            except PeerGone:
                self._peer_gone()
        return progress

    def _sleep(self, timeout_ms: int | None) -> None:
        """One poll on the descriptors the blocked operations wait for, and the selfpipe."""
        blocked = self.blocked
        wanted: set[object] = set(self.m.wanted())
        if self.link.has_output():
            wanted.add(_FLUSH)
        for op in [op for op in blocked if op not in wanted]:
            del blocked[op]
        events = {self.selfpipe: select.POLLIN}
        for fd, ev in blocked.values():
            events[fd] = events.get(fd, 0) | ev
        for fd in self.registered.keys() - events.keys():
            self.poller.unregister(fd)
        for fd, ev in events.items():
            if self.registered.get(fd) != ev:
                self.poller.register(fd, ev)
        self.registered = events
        ready = dict(self.poller.poll(timeout_ms))
        if self.selfpipe in ready:
            blocked.clear()  # an exit or a signal changes what the operations find
            self._read_selfpipe()
        for op, (fd, ev) in list(blocked.items()):
            if ready.get(fd, 0) & (ev | _HANGUP):
                del blocked[op]
        self.m.tick(time.monotonic())

    def _timeout_ms(self) -> int | None:
        return wait_ms(self.m.deadline(), time.monotonic())

    def _read_selfpipe(self) -> None:
        """Report the application's exit and the signals the selfpipe delivered."""
        for sig in read_signals(self.selfpipe):
            if sig != signal.SIGCHLD and not self.m.finished:
                self.m.signal(sig)
        if self.pid is not None and self.m.status is None:
            got, status = os.waitpid(self.pid, os.WNOHANG)
            if got == self.pid:
                self.m.app_exited(status)

    def abort(self) -> None:
        """After an exception of our own: close everything, kill and reap the application."""
        m = self.m
        if self.app_sock is not None:
            self.app_sock.close()
        else:
            for fd, is_open in ((self.cread, m.app_output_open), (self.cwrite, m.app_input_open)):
                if is_open:
                    os.close(fd)
        self.m.app_output_open = self.m.app_input_open = False
        if self.m.net_open:
            self.link.close()
            self.m.net_open = False
        if self.pid is not None and self.m.status is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)

    # -- the application ---------------------------------------------------

    def _op_read_app(self) -> None:
        n = self._read_app()
        if n:
            self.m.app_read(n)
        elif n == 0:
            self.m.app_eof()

    def _read_app(self) -> int | None:
        """Read the application's output into ``outbound.space()``: how much, 0 at its end.

        None when there is nothing and the application is dead (the machine
        took that as the end); ``WouldBlock`` when there is nothing yet.
        """
        try:
            return os.readv(self.cread, [self.m.outbound.space()])
        except BlockingIOError:
            if self.m.app_read_blocked():
                raise WouldBlock(self.cread, select.POLLIN) from None
        return None

    def _op_write_app(self) -> None:
        m = self.m
        try:
            n = os.write(self.cwrite, m.inbound.data())
        except BlockingIOError:
            raise WouldBlock(self.cwrite, select.POLLOUT) from None
        except BrokenPipeError:
            m.app_gone()
        else:
            m.app_written(n)

    def _op_read_datagram(self) -> None:
        n = self._read_app()
        if n:
            self.m.app_datagram(n)
        # 0: the other end shut its output, or it sent an empty datagram (nothing to carry)
        elif n == 0 and poll_now(self.cread, select.POLLIN | select.POLLRDHUP) & _PEER_SHUT:
            self.m.app_eof()

    def _op_close_app_output(self) -> None:
        self._close_app_side(self.cread, socket.SHUT_RD, self.m.app_input_open)
        self.m.app_output_closed()

    def _op_close_app_input(self) -> None:
        self._close_app_side(self.cwrite, socket.SHUT_WR, self.m.app_output_open)
        self.m.app_input_closed()

    def _close_app_side(self, fd: int, how: int, other_open: bool) -> None:
        """Close one of the application's descriptors, or shut its way of the one socket."""
        if self.app_sock is None:
            os.close(fd)
        elif other_open:
            with contextlib.suppress(OSError):  # ENOTCONN: the application closed its end
                self.app_sock.shutdown(how)
        else:
            self.app_sock.close()

    def _op_signal_app(self) -> None:
        for sig in self.m.take_signals():
            assert self.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    # -- the peer ----------------------------------------------------------

    def _peer_gone(self) -> None:
        if self.m.out is not Out.CLOSED:
            self.m.peer_gone()

    def _op_send(self) -> None:
        m = self.m
        try:
            n = self.link.send(m.outbound.data())
        except WouldBlock as wb:
            if wb.pending:
                m.send_blocked()
            raise
        except PeerGone:
            m.peer_gone()
        except SSL.Error as exc:
            m.send_failed(error_reason(exc))
        else:
            m.sent(n)

    def _op_notify(self) -> None:
        try:
            self.link.notify()
        except PeerGone:
            self.m.peer_gone()
        except SSL.Error as exc:
            self.m.send_failed(error_reason(exc))
        else:
            self.m.notified()

    def _op_shut_write(self) -> None:
        try:
            self.link.shut_write()
        except PeerGone:
            self.m.peer_gone()
        else:
            self.m.shut()

    def _op_abandon_write(self) -> None:
        self.link.abandon_write()
        self.m.shut()

    def _op_recv(self) -> None:
        m = self.m
        try:
            n = self.link.recv(m.inbound.space())
        except PeerGone:  # the TLS layer had to answer, and the peer reads no more
            self._peer_gone()
        except SSL.Error as exc:
            m.peer_failed(error_reason(exc))
        else:
            if n:
                m.peer_data(n)
            else:
                m.peer_closed(self.link.close_notify_received)

    def _op_close_net(self) -> None:
        self.link.close()
        self.m.net_closed()


class _KernelLoop(_Loop):
    """The loop when the kernel runs the records (``ktls.path.KernelPath`` as the link).

    Data is spliced between the pipes and the socket and never enters the
    machine's buffers: READ_APP reports ``app_read`` and ``sent`` at once,
    RECV ``peer_data`` and ``app_written`` (or ``peer_data`` alone when the
    application's input is closed and the data is dropped); SEND and
    WRITE_APP are never wanted.  The machine decides everything else, as
    for the userspace path.
    """

    link: "KernelPath"

    def _op_read_app(self) -> None:
        m = self.m
        try:
            n = self.link.move_out(self.cread)
        except WouldBlock as wb:
            if wb.fd != self.cread or m.app_read_blocked():
                raise
        except PeerGone:
            m.peer_gone()
        except TlsRuntimeError as exc:
            m.send_failed(str(exc))
        else:
            if n:
                m.app_read(n)
                m.sent(n)
            else:
                m.app_eof()

    def _op_recv(self) -> None:
        m = self.m
        dropping = m.in_ is In.DISCARDING
        try:
            n = self.link.move_in(None if dropping else self.cwrite)
        except BrokenPipeError:
            m.app_gone()
        except TlsRuntimeError as exc:
            m.peer_failed(str(exc))
        else:
            if n is None:
                return
            if n > 0:
                m.peer_data(n)
                if not dropping:
                    m.app_written(n)
            else:  # 0: a bare EOF; negative: the peer's close_notify
                m.peer_closed(n < 0)

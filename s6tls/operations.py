"""What one connection's loop does for its ``Lifetime``: the operations, on its descriptors.

A ``Lifetime`` says which operations are wanted; ``Operations`` performs
them on the connection's link and the application's two descriptors, and
reports what each one found back to the machine, one event each.  An
operation that must wait raises ``WouldBlock``; it is then *blocked* on a
descriptor until the loop reports that descriptor ready (``ready``).

Two loops drive it: ``engine.run``, the loop of one connection (s6-tlsd,
s6-tlsc, s6-tlsclient, the library), and the worker loop of s6-tlsserver
and s6-dtlsserver, which drives many.  Both call ``step`` when something
may have changed, sleep on ``waits()`` until the machine's ``deadline()``,
and tell the machine the time.  Neither decides anything: the machine does.

Nothing here holds a reference back to the loop, and the operations are
looked up in class-level tables, so a finished connection leaves no
reference cycle behind (a long-lived worker would keep such garbage until a
full collection).
"""

import contextlib
import os
import select
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from OpenSSL import SSL

from .errors import TlsRuntimeError
from .lifetime import CONTROL_OPS, DATA_OPS, In, Lifetime, Op, Out
from .link import Link, PeerGone, WouldBlock, poll_now
from .tls.reasons import error_reason

if TYPE_CHECKING:
    from .ktls.path import KernelPath

HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
_PEER_SHUT = select.POLLRDHUP | select.POLLHUP  # a socket whose other end shut its output
FLUSH = "flush"  # the link's own operation: write out what TLS produced
PASSES = 16  # passes over the operations in one step, between two looks at the rest


class Operations:
    """The operations of one connection whose handshake is done.

    Args:
        machine: the connection's ``Lifetime``.
        link: its ciphertext side (``link.Link``), or a ``ktls.path.KernelPath``
            for ``KernelOperations``.
        cread, cwrite: the application's output (read) and input (write):
            two pipes, or one socket (a socketpair's end), both non-blocking.
        pid: the application's pid, or None.

    ``step()`` performs what the machine wants until nothing moves (or
    ``PASSES`` passes); ``waits()`` gives the descriptors the blocked
    operations wait for; ``ready(fd, revents)`` unblocks them.  The loop
    reports the application's exit (``machine.app_exited``) and the signals
    for it (``machine.signal``) itself, then calls ``unblock()``.

    ``abort()`` after an exception of the loop's own closes every
    descriptor and kills the application; the machine is told.
    """

    # op -> the method performing it; class-level, so that no instance holds a
    # bound method of itself (a reference cycle per connection).
    PERFORM: ClassVar[dict[Op, Callable[["Operations"], None]]]

    def __init__(
        self, machine: Lifetime, link: "Link | KernelPath", cread: int, cwrite: int, pid: int | None
    ) -> None:
        self.m = machine
        self.link = link
        self.cread = cread
        self.cwrite = cwrite
        self.pid = pid
        # One socket for both directions of the application: shut each, close once.
        self.app_sock = socket.socket(fileno=cread) if cread == cwrite else None
        self.read_app: Callable[[Operations], None] = (
            Operations.read_datagram if machine.datagram else type(self).read_app_output
        )
        self.blocked: dict[object, tuple[int, int]] = {}  # operation -> (fd, poll events)

    # -- what the loop calls ---------------------------------------------------

    def step(self, now: Callable[[], float]) -> bool:
        """Perform wanted operations, pass after pass, until a pass does nothing.

        ``now()`` is the clock the machine is told after each pass.  Returns
        True when it stopped at its bound (``PASSES``) with work still
        moving: the loop should look at its other descriptors, then come
        back at once.
        """
        m = self.m
        for _ in range(PASSES):
            progress = self._pass()
            m.tick(now())
            if not progress or m.finished:
                return False
        return True

    def waits(self) -> dict[int, int]:
        """The descriptors the blocked operations wait for, and their poll events.

        Operations the machine no longer wants stop waiting first.
        """
        blocked = self.blocked
        wanted: set[object] = set(self.m.wanted())
        if self.link.has_output():
            wanted.add(FLUSH)
        for op in [op for op in blocked if op not in wanted]:
            del blocked[op]
        events: dict[int, int] = {}
        for fd, ev in blocked.values():
            events[fd] = events.get(fd, 0) | ev
        return events

    def ready(self, fd: int, revents: int) -> None:
        """``fd`` is ready for ``revents``: the operations waiting for it may go on."""
        for op, (wfd, ev) in list(self.blocked.items()):
            if wfd == fd and revents & (ev | HANGUP):
                del self.blocked[op]

    def unblock(self) -> None:
        """Something else changed (an exit, a signal): every operation may try again."""
        self.blocked.clear()

    def abort(self) -> None:
        """After an exception of the loop's own: close everything, kill the application.

        The machine is told (``loop_failed``); the application's exit is
        still to be reported (``engine.run`` waits for it, a worker reaps it).
        """
        m = self.m
        app_output, app_input, net = m.app_output_open, m.app_input_open, m.net_open
        m.loop_failed()
        if self.app_sock is not None:
            if app_output or app_input:
                self.app_sock.close()
        else:
            for fd, is_open in ((self.cread, app_output), (self.cwrite, app_input)):
                if is_open:
                    os.close(fd)
        if net:
            self.link.close()
        if self.pid is not None and m.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    # -- one pass ------------------------------------------------------------------

    def _pass(self) -> bool:
        """Try each wanted operation once; True if any of them did something."""
        progress = self._try(DATA_OPS)
        progress = self._try(self.m.control_ops()) or progress  # as the data ops left it
        blocked = self.blocked
        if FLUSH not in blocked and self.link.has_output():
            try:
                self.link.flush()
            except WouldBlock as wb:
                blocked[FLUSH] = (wb.fd, wb.events)
            except PeerGone:
                self._peer_gone()
        return progress

    def _try(self, ops: tuple[Op, ...]) -> bool:
        """Perform each of ``ops`` the machine wants now; True if any did something."""
        m, blocked, perform = self.m, self.blocked, self.PERFORM
        progress = False
        for op in ops:
            if op not in blocked and m.wants(op):
                try:
                    perform[op](self)
                    progress = True
                except WouldBlock as wb:
                    blocked[op] = (wb.fd, wb.events)
        return progress

    # -- the application ---------------------------------------------------------

    def _op_read_app(self) -> None:
        self.read_app(self)

    def read_app_output(self) -> None:
        n = self._read_app()
        if n:
            self.m.app_read(n)
        elif n == 0:
            self.m.app_eof()

    def _read_app(self) -> int | None:
        """Read the application's output into ``outbound.space()``: how much, 0 at its end.

        None when there is nothing and the application is dead (the machine
        took that as the end); ``WouldBlock`` when there is nothing yet (the
        buffer's memory is given back meanwhile).  A datagram socketpair
        whose application closed its end with datagrams unread reports a
        reset: that is its end too.
        """
        outbound = self.m.outbound
        try:
            return os.readv(self.cread, [outbound.space()])
        except ConnectionResetError:  # a socketpair whose other end closed with data unread
            return 0
        except BlockingIOError:
            outbound.release()
            if self.m.app_read_blocked():
                raise WouldBlock(self.cread, select.POLLIN) from None
        return None

    def read_datagram(self) -> None:
        n = self._read_app()
        if n:
            self.m.app_datagram(n)
        # 0: the other end shut its output, or it sent an empty datagram (nothing to carry)
        elif n == 0 and poll_now(self.cread, select.POLLIN | select.POLLRDHUP) & _PEER_SHUT:
            self.m.app_eof()

    def _op_write_app(self) -> None:
        m = self.m
        try:
            n = os.write(self.cwrite, m.inbound.data())
        except BlockingIOError:
            raise WouldBlock(self.cwrite, select.POLLOUT) from None
        except (BrokenPipeError, ConnectionResetError):  # it reads nothing more: its ending
            m.app_gone()
        else:
            m.app_written(n)

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

    # -- the peer ----------------------------------------------------------------

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
        inbound = m.inbound
        try:
            n = self.link.recv(inbound.space())
        except WouldBlock:
            inbound.release()
            raise
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


Operations.PERFORM = {
    Op.READ_APP: Operations._op_read_app,
    Op.SEND: Operations._op_send,
    Op.NOTIFY: Operations._op_notify,
    Op.SHUT_WRITE: Operations._op_shut_write,
    Op.ABANDON_WRITE: Operations._op_abandon_write,
    Op.CLOSE_APP_OUTPUT: Operations._op_close_app_output,
    Op.RECV: Operations._op_recv,
    Op.WRITE_APP: Operations._op_write_app,
    Op.CLOSE_APP_INPUT: Operations._op_close_app_input,
    Op.CLOSE_NET: Operations._op_close_net,
    Op.SIGNAL_APP: Operations._op_signal_app,
}
assert set(Operations.PERFORM) == {*DATA_OPS, *CONTROL_OPS}


class KernelOperations(Operations):
    """The operations when the kernel runs the records (``ktls.path.KernelPath`` as the link).

    Data is spliced between the pipes and the socket and never enters the
    machine's buffers: READ_APP reports ``app_read`` and ``sent`` at once,
    RECV ``peer_data`` and ``app_written`` (or ``peer_data`` alone when the
    application's input is closed and the data is dropped); SEND and
    WRITE_APP are never wanted.  The machine decides everything else, as
    for the userspace path.
    """

    link: "KernelPath"

    def read_app_output(self) -> None:
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


KernelOperations.PERFORM = {**Operations.PERFORM, Op.RECV: KernelOperations._op_recv}

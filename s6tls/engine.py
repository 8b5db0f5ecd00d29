"""The full-duplex pump between an application and a TLS peer: libstls's stls_run.

``run`` is the thin I/O loop of one connection around ``lifetime.Lifetime``:
its ``operations.Operations`` perform what the machine wants and feed back
what each one found, and the loop sleeps in one ``poll`` per wake-up, on
exactly the descriptors some operation waits for plus the selfpipe, until
the machine's next deadline.  It decides nothing itself, and knows nothing
of command lines, the environment or exit codes.  (s6-tlsserver's workers
drive the same operations for many connections from one loop.)
"""

import contextlib
import os
import select
import signal
import stat
import time
from typing import TYPE_CHECKING

from OpenSSL import SSL

from .deadline import wait_ms
from .lifetime import Lifetime, Stats
from .link import Link
from .operations import KernelOperations, Operations
from .selfpipe import read_signals

if TYPE_CHECKING:
    from .ktls.path import KernelPath


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
            half-close; -s, the default, only half-closes under TLS 1.2
            (under TLS 1.3 a close_notify always comes first: ``lifetime``).
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
    machine = machine_for(
        link,
        app=pid is not None,
        close_notify=close_notify,
        strict_close_notify=strict_close_notify,
        idle_timeout=idle_timeout,
        stats=stats,
    )
    ops = operations_for(machine, link, (cread, cwrite), pid, ktls)
    try:
        os.set_blocking(cread, False)
        os.set_blocking(cwrite, False)
        _Poller(ops, selfpipe).run()
    except BaseException:
        ops.abort()
        if pid is not None and machine.status is None:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)  # killed by abort: at once
        raise
    return machine.result()


def machine_for(
    link: Link,
    *,
    app: bool,
    close_notify: bool = False,
    strict_close_notify: bool = False,
    idle_timeout: float | None = None,
    stats: Stats | None = None,
) -> Lifetime:
    """The ``Lifetime`` of ``link``, whose handshake is done, from now on.

    ``app``: there is an application to watch; the other arguments are
    ``run``'s.  From then on OpenSSL takes a bare EOF for an EOF: -J is the
    machine's to decide.
    """
    link.conn.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    return Lifetime(
        close_notify=close_notify,
        strict_close_notify=strict_close_notify,
        tls12=link.conn.get_protocol_version_name() != "TLSv1.3",
        app=app,
        idle_timeout=idle_timeout,
        now=time.monotonic(),
        stats=stats,
        max_datagram=link.max_datagram,
    )


def operations_for(
    machine: Lifetime, link: Link, app: tuple[int, int], pid: int | None, ktls: bool
) -> Operations:
    """The operations of ``machine`` on ``link`` and the application's descriptors ``app``.

    With ``ktls``, on the kernel path if the kernel takes the connection
    (``machine.stats.path`` says which path, and why).
    """
    path = _kernel_path(link, app, machine) if ktls else None
    if path is None:
        return Operations(machine, link, *app, pid)
    return KernelOperations(machine, path, *app, pid)


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


class _Poller:
    """The loop of one connection: one ``poll`` per wake-up, on what its operations wait for.

    The selfpipe reports the application's exit (SIGCHLD, then a ``waitpid``
    of its pid alone) and the signals to pass on to it.
    """

    def __init__(self, ops: Operations, selfpipe: int) -> None:
        self.ops = ops
        self.selfpipe = selfpipe
        self.poller = select.poll()
        self.registered: dict[int, int] = {}

    def run(self) -> None:
        """Perform operations until the machine is finished."""
        ops, m = self.ops, self.ops.m
        self._read_selfpipe()
        while not m.finished:
            again = ops.step(time.monotonic)
            if not m.finished:
                self._sleep(0 if again else wait_ms(m.deadline(), time.monotonic()))

    def _sleep(self, timeout_ms: int | None) -> None:
        """One poll on the descriptors the blocked operations wait for, and the selfpipe."""
        events = self.ops.waits()
        events[self.selfpipe] = select.POLLIN
        for fd in self.registered.keys() - events.keys():
            self.poller.unregister(fd)
        for fd, ev in events.items():
            if self.registered.get(fd) != ev:
                self.poller.register(fd, ev)
        self.registered = events
        ready = self.poller.poll(timeout_ms)
        for fd, revents in ready:
            if fd == self.selfpipe:
                self.ops.unblock()  # an exit or a signal changes what the operations find
                self._read_selfpipe()
            else:
                self.ops.ready(fd, revents)
        self.ops.m.tick(time.monotonic())

    def _read_selfpipe(self) -> None:
        """Report the application's exit and the signals the selfpipe delivered."""
        m, pid = self.ops.m, self.ops.pid
        for sig in read_signals(self.selfpipe):
            if sig != signal.SIGCHLD and not m.finished:
                m.signal(sig)
        if pid is not None and m.status is None:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                m.app_exited(status)

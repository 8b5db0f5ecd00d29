"""One connection as a worker serves it: its phases, its descriptors, its deadline.

A worker (``serve.worker``) drives many ``Served`` connections from one
loop.  Each one goes through named phases, and tells the worker, after
every event, what it waits for (``waits``: descriptors and poll events) and
when it must be woken at the latest (``deadline``):

* ``BEFORE_TLS``: what a subclass does first (s6-tlsserver's banner, PROXY
  header and rules, ``stream.StreamConnection``);
* ``HANDSHAKE``: the non-blocking handshake, one step per wake-up, under
  -K (and a DTLS retransmission timer);
* ``RUNNING``: the application is spawned, and the connection's
  ``Lifetime`` machine is driven through ``operations.Operations``, kernel
  TLS included, exactly as ``engine.run`` drives it for one connection;
* ``DONE``: every descriptor is closed and the application reaped; ``code``
  is the connection's exit code, as s6-tlsd's would be.

A connection is *early* (it may be dropped: at SIGTERM, or to make room,
``admission``) until its handshake is done.  Every failure a peer can cause
ends the connection with its documented code and one line naming the peer;
``abort`` is for the rest (a bug of ours, a system call that failed): the
worker calls it when a method raised, and the connection alone ends, 111.
"""

import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from OpenSSL import SSL

from ..cli import Log, failure
from ..deadline import after_ms, earliest
from ..engine import machine_for, operations_for
from ..errors import ExitCode, S6tlsError, TlsRuntimeError
from ..lifetime import Lifetime, Stats
from ..link import Link
from ..operations import Operations
from ..tls.config import TlsConfig
from ..tls.handshake import handshake_step, handshake_timeout
from .admission import Table, Ticket
from .app import Inherited
from .tunnel import Application, closing, ended, handshake_failed, open_link, start_application

if TYPE_CHECKING:
    from ..net.gate import Gate
    from ..tls.perclient import ClientContexts
    from .connection import Setup


class Host(Protocol):
    """What a served connection needs of the worker that serves it (``worker.Worker``)."""

    setup: "Setup"
    inherited: Inherited  # what the applications inherit from the worker's environment
    log: Log
    pid: int
    table: Table
    gate: "Gate | None"
    client_contexts: "ClientContexts"

    def watch_app(self, pid: int, conn: "Served") -> None:
        """``conn``'s application is ``pid``: its exit is ``conn``'s to hear."""

    def submit(
        self, conn: "Served", job: Callable[[], Any], then: Callable[[Any], None], key: object
    ) -> None:
        """Run ``job()`` away from the loop; then ``then(outcome)`` in it, for ``conn``
        and every connection that submitted a job of the same ``key`` meanwhile."""


class Phase(Enum):
    """Where a served connection is."""

    BEFORE_TLS = "before TLS"
    HANDSHAKE = "handshake"
    RUNNING = "running"
    DONE = "done"


class Served:
    """A connection a worker serves, from its admission to its end; see the module docstring.

    Args:
        worker: the worker serving it (its configuration, table and clock).
        ticket: its slot in the admission table.
        peer: ``IP:PORT`` for the log lines.
        fd: the connection's socket (owned from now on).
        sock: its socket object, if the caller has one (owned too).
        env: the variables the application gets beyond the worker's own
            (``PROTO``, ``TCPREMOTEIP``...), updated before TLS if need be;
            ``env_changes`` (an access rule's, which may unset some) go last.
    """

    def __init__(
        self,
        worker: Host,
        ticket: Ticket,
        peer: str,
        fd: int,
        env: dict[str, str],
        sock: socket.socket | None = None,
    ) -> None:
        self.worker = worker
        self.ticket = ticket
        self.peer = peer
        self.fd = fd
        self.sock = sock
        self.env = env
        self.log: Log = worker.log.about(peer, worker.pid)
        self.phase = Phase.BEFORE_TLS
        self.code: int | None = None  # the exit code, once DONE
        self.app: Application | None = None
        self.link: Link | None = None
        self.machine: Lifetime | None = None
        self.ops: Operations | None = None
        self.stats = Stats()
        self.prog: tuple[str, ...] = worker.setup.app
        self.cfg: TlsConfig = worker.setup.cfg  # an access rule may give its own TLS settings
        self.ctx: SSL.Context = worker.setup.ctx
        self.hello: bytes | None = None  # DTLS: the verified ClientHello
        self.env_changes: list[tuple[str, str | None]] = []  # an access rule's, applied last
        self._waits: dict[int, int] = {}
        self._until: float | None = None  # the phase's own deadline
        self._failed: tuple[int, str] | None = None  # abort()'s code and line
        self.cid = -1  # its number in its worker, once added
        self.again = False  # stopped at its bound with work left: step again at once
        self.spoke = False  # the peer sent a byte of its handshake

    # -- what the worker asks --------------------------------------------------

    @property
    def early(self) -> bool:
        """True before the handshake is done: the connection may be dropped."""
        return self.phase in (Phase.BEFORE_TLS, Phase.HANDSHAKE)

    def waits(self) -> dict[int, int]:
        """The descriptors this connection waits for now, with their poll events."""
        if self.phase is Phase.RUNNING:
            assert self.ops is not None
            return self.ops.waits()
        return self._waits

    def deadline(self) -> float | None:
        """When the worker must call ``on_time`` at the latest; None: never."""
        if self.phase is Phase.RUNNING:
            assert self.machine is not None
            return self.machine.deadline()
        if self.phase is Phase.HANDSHAKE:
            assert self.link is not None
            return earliest(self._until, self.link.wakeup())
        return self._until

    # -- events ------------------------------------------------------------------

    def on_ready(self, fd: int, revents: int) -> None:
        """``fd`` is ready for ``revents``."""
        if self.phase is Phase.RUNNING:
            assert self.ops is not None
            self.ops.ready(fd, revents)
            self.step()
        elif self.phase is Phase.HANDSHAKE:
            self._handshake()
        elif self.phase is Phase.BEFORE_TLS:
            self.before_tls_ready(fd, revents)

    def on_time(self, now: float) -> None:
        """The deadline may have come (the worker may ask early: nothing is due then)."""
        if self.phase is Phase.RUNNING:
            assert self.machine is not None
            self.machine.tick(now)
            self.step()
        elif self._until is not None and now >= self._until:
            if self.phase is Phase.HANDSHAKE:
                assert self.link is not None
                self.fail_handshake(handshake_timeout(self.link))
            else:
                self.before_tls_timeout()
        elif self.phase is Phase.HANDSHAKE:
            assert self.link is not None
            wakeup = self.link.wakeup()
            if wakeup is not None and now >= wakeup:
                self._handshake()  # a DTLS retransmission is due

    def on_exit(self, status: int) -> None:
        """The application was reaped with wait ``status``."""
        assert self.machine is not None and self.ops is not None
        self.machine.app_exited(status)
        self.ops.unblock()
        self.step()

    def on_signal(self, sig: int) -> None:
        """A signal for the application (SIGQUIT's SIGTERM to the running ones)."""
        if self.phase is Phase.RUNNING:
            assert self.machine is not None
            if not self.machine.finished:
                self.machine.signal(sig)
                self.step()

    def drop(self, why: str) -> None:
        """End an early connection now (SIGTERM, or its slot was taken): status 98."""
        if self.phase is Phase.HANDSHAKE and self.link is not None:
            self.link.close()
        elif self.phase is Phase.BEFORE_TLS:
            self.close_before_tls()
        self.log.info(f"dropped {why}")
        self._done(ExitCode.TLS)

    def abort(self, exc: BaseException) -> None:
        """After ``exc`` escaped one of this connection's methods: end it alone, 111.

        One line names the peer.  A running application is killed and
        still reaped before the connection is over.
        """
        code, line = failure(exc)
        if not isinstance(exc, S6tlsError):
            code = ExitCode.SYSTEM
        self.log.warn(line)
        self.log.traceback()
        if self.phase is Phase.RUNNING and self.ops is not None and self.machine is not None:
            self._failed = (code, line)
            if not self.machine.finished:
                self.ops.abort()
            if self.machine.finished:
                self._done(code)
            return
        if self.phase is Phase.DONE:
            return
        if self.link is not None:
            self.link.close()
        elif self.phase is Phase.BEFORE_TLS:
            self.close_before_tls()
        self._done(code)

    # -- before TLS: what a subclass adds ---------------------------------------

    def start(self) -> None:
        """The connection was just admitted: begin (by default, the handshake)."""
        self.begin_handshake()

    def before_tls_ready(self, fd: int, revents: int) -> None:
        """A descriptor waited for before TLS is ready."""

    def before_tls_timeout(self) -> None:
        """The deadline before TLS passed."""

    def close_before_tls(self) -> None:
        """Close what is open before TLS: the socket."""
        if self.sock is not None:
            self.sock.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd, self.sock = -1, None

    def wait_before_tls(self, events: dict[int, int], until: float | None) -> None:
        """Before TLS, wait for ``events`` until ``until`` (monotonic)."""
        self._waits = events
        self._until = until

    # -- the handshake --------------------------------------------------------------

    def begin_handshake(self) -> None:
        """TLS starts on the socket, with the worker's context, under -K."""
        cfg = self.cfg
        fd, sock, self.fd, self.sock = self.fd, self.sock, -1, None  # the link's now
        self.link = open_link(cfg, self.ctx, fd, fd, self.hello, sock)
        self.spoke = self.hello is not None  # a DTLS ClientHello, verified
        self.hello = None
        self.phase = Phase.HANDSHAKE
        self._waits = {}
        self._until = after_ms(cfg.options.handshake_timeout_ms, time.monotonic())
        self._handshake()

    def _handshake(self) -> None:
        assert self.link is not None
        if not self.spoke:
            self.spoke = _queued(self.link.rfd) > 0
        try:
            wait = handshake_step(self.link)
        except S6tlsError as exc:
            self.fail_handshake(exc)
            return
        if wait is not None:
            self._waits = {wait.fd: wait.events}
            return
        self._waits = {}
        self._until = None
        if not self.worker.table.established(self.ticket):
            self.drop("in the handshake, to make room")
            return
        self._run()

    def fail_handshake(self, exc: S6tlsError) -> None:
        """The handshake failed (97) or timed out (98): one line, and the end.

        A warning, unless the peer never sent a byte (a port scan, a health
        check, a silent socket): then an info line, so that such peers do not
        decide how much is logged.
        """
        assert self.link is not None
        error = handshake_failed(self.link, exc)
        (self.log.warn if self.spoke else self.log.info)(str(error))
        self._done(error.exit_code)

    # -- running ----------------------------------------------------------------------

    def _run(self) -> None:
        """Spawn the application, then let the machine decide."""
        assert self.link is not None
        cfg = self.cfg
        env = self.worker.inherited.with_changes(self.env, self.env_changes)
        try:
            self.app = start_application(cfg, self.link, self.prog, env, (0, 1))
        except S6tlsError as exc:
            self.link.close()
            self.log.warn(str(exc))
            self._done(exc.exit_code)
            return
        for fd in self.app.ours:
            os.set_blocking(fd, False)
        self.machine = machine_for(self.link, app=True, stats=self.stats, **closing(cfg))
        self.ops = operations_for(
            self.machine, self.link, self.app.ours, self.app.pid, cfg.options.ktls
        )
        self.phase = Phase.RUNNING
        self.worker.watch_app(self.app.pid, self)
        self.step()

    def step(self) -> None:
        """Perform what the machine wants; end once it is finished."""
        assert self.ops is not None and self.machine is not None
        if not self.machine.finished:
            self.again = self.ops.step(time.monotonic)
        if self.machine.finished:
            self._end()

    def _end(self) -> None:
        assert self.machine is not None and self.link is not None and self.app is not None
        if self._failed is not None:
            self._done(self._failed[0])
            return
        try:
            status = self.machine.result()
        except TlsRuntimeError as exc:
            self.log.warn(str(exc))
            self._done(exc.exit_code)
            return
        assert status is not None
        self._done(ended(self.cfg, self.link, self.app, self.stats, status, self.log))

    def _done(self, code: int) -> None:
        self.phase = Phase.DONE
        self.code = code
        self._waits = {}
        self._until = None
        self.again = False

    @property
    def app_pid(self) -> int | None:
        """The application's pid, once spawned."""
        return self.app.pid if self.app is not None else None


def _queued(fd: int) -> int:
    """The bytes waiting to be read on the socket ``fd`` (0 if it cannot say)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0

"""s6-tlsserver's connections in a worker: accept, what comes before TLS, then TLS.

``accept`` takes the connections waiting on a listening socket (at most
``ACCEPT_BURST`` per wake-up), admits each in the shared table (-c, -C:
``admission``) and serves it as a ``StreamConnection``, which does what
s6-tcpserver-access and proxy-server would do before s6-tlsd
(``net.gate``), without ever waiting:

1. ``-D`` and ``-B banner`` at once;
2. ``-L``: the PROXY header, read as its bytes come, within ``-K``;
3. the access rules and the name look-ups: in the worker's thread pool
   when names are looked up (the resolver may take its time; the
   connections from one address share one check), at once otherwise; an
   access rule's ``env/`` changes the application's environment, and the
   connection's TLS settings where it sets theirs (``tls.perclient``); its
   ``exec`` replaces the application;

then the handshake and the rest (``served.Served``).  A refused client
ends with status 1 and never sees a TLS byte.
"""

import errno
import select
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from ..deadline import after_ms
from ..errors import ExitCode, HandshakeTimeout, Refused, S6tlsError
from ..net.access import Admission, Denied
from ..net.gate import apply_proxy_header, read_proxy_header
from ..net.proxyproto import HeaderReader
from ..net.ucspi import peer_address, unmap, variables
from ..tls.perclient import tls_changes
from .served import Served
from .worker import PAUSING_ERRORS, Worker

T = TypeVar("T")
ACCEPT_BURST = 16  # connections taken per wake-up of a listening socket


def accept(worker: Worker, listener: socket.socket) -> None:
    """Take the connections waiting on ``listener``: admitted, or closed at once.

    None once the worker is full (``Worker.has_room``): they wait for another.
    """
    for _ in range(ACCEPT_BURST):
        if not worker.has_room():
            return
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return  # the supervisor shut the socket down: SIGTERM is on its way
            worker.trouble_with("unable to accept", exc, exc.errno in PAUSING_ERRORS)
            return
        worker.trouble_over()
        ip = unmap(addr[0])
        ticket = worker.admit(ip, addr[1])
        if ticket is None:
            sock.close()  # refused: counted, and summed up by the supervisor
            continue
        env = variables("TCP", sock.getsockname(), addr)
        env["TCPCONNNUM"] = str(ticket.number)
        peer = peer_address(ip, addr[1])
        worker.add(StreamConnection(worker, ticket, peer, sock.fileno(), env, sock))


class StreamConnection(Served):
    """A TCP connection of s6-tlsserver; see the module docstring."""

    reader: HeaderReader | None = None  # -L: the PROXY header, while it comes

    def start(self) -> None:
        gate = self.worker.gate
        assert gate is not None and self.sock is not None
        try:
            gate.prepare(self.sock)
        except Refused as exc:
            self._refuse(exc)
            return
        if gate.proxy:
            self.reader = HeaderReader()
            until = after_ms(self.worker.setup.cfg.options.handshake_timeout_ms, time.monotonic())
            self.wait_before_tls({self.fd: select.POLLIN}, until)
        else:
            self._check()

    def before_tls_ready(self, fd: int, revents: int) -> None:
        """The PROXY header's bytes."""
        assert self.reader is not None
        try:
            header = read_proxy_header(self.fd, self.reader)
        except Refused as exc:
            self._refuse(exc)
            return
        if header is None:
            return
        apply_proxy_header(header, self.env)
        self.reader = None
        self.peer = peer_address(self.env["TCPREMOTEIP"], self.env["TCPREMOTEPORT"])
        self.log = self.worker.log.about(self.peer, self.worker.pid)
        self._check()

    def before_tls_timeout(self) -> None:
        self.close_before_tls()
        self.log.warn(str(HandshakeTimeout("PROXY header timed out")))
        self._refused_with(ExitCode.TLS)

    def _check(self) -> None:
        """The rules and the names: in the pool if names are looked up, else now."""
        gate = self.worker.gate
        assert gate is not None
        self.wait_before_tls({}, None)
        env = dict(self.env)
        warnings: list[str] = []

        def check() -> tuple[Admission, list[str]]:
            return gate.check(env, warnings.append), warnings

        if gate.access.dns:
            key = (env["TCPREMOTEIP"], env["TCPLOCALIP"])  # all the check depends on
            self.worker.submit(self, check, self._checked, key)
        else:
            self._checked(_outcome(check))

    def _checked(self, outcome: "tuple[Admission, list[str]] | BaseException") -> None:
        if isinstance(outcome, Denied):
            self.close_before_tls()
            self.log.info(str(outcome))
            self._refused_with(outcome.exit_code)
            return
        if isinstance(outcome, S6tlsError):
            self._refuse(outcome)
            return
        if isinstance(outcome, BaseException):
            raise outcome  # a fault of ours: the worker ends this connection alone
        admission, warnings = outcome
        for line in warnings:
            self.log.warn(line)
        changes = tls_changes(admission.env)
        if changes:
            try:
                self.cfg, self.ctx = self.worker.client_contexts.get(changes)
            except S6tlsError as exc:
                self.close_before_tls()
                self.log.warn(f"rule {admission.rule}: {exc}")
                self._refused_with(exc.exit_code)
                return
        self.env_changes = list(admission.env)
        if admission.exec is not None:
            self.prog = ("execlineb", "-c", admission.exec)
        self.begin_handshake()

    def _refuse(self, exc: S6tlsError) -> None:
        self.close_before_tls()
        self.log.warn(str(exc))
        self._refused_with(exc.exit_code)

    def _refused_with(self, code: int) -> None:
        self.wait_before_tls({}, None)
        self._done(code)


def _outcome(job: Callable[[], T]) -> T | Exception:
    """What ``job()`` returns, or the exception it raises (as the pool would hand it)."""
    try:
        return job()
    except Exception as exc:
        return exc

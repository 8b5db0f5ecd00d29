"""s6-tlsserver: TCP listener plus s6-tlsd, as one fork-server.

Everything is imported and every TLS context built once, before the first
accept; each connection is then served by a forked child of this already
initialised process (no new interpreter), which runs the s6-tlsd logic
(``Setup.serve_connection``) and exits with prog's status.  The loop, the
spare child, the limits and the signals are ``serve.forkserver``'s, shared with
s6-dtlsserver; what is TCP's is here: the listening socket, accept, and
what comes before TLS (banner, PROXY header, access rules).  Under
systemd, the listening sockets may come from a socket unit.  See
man/s6-tlsserver.1.
"""

import dataclasses
import socket
from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net import gate, systemd
from .net.listen import bound_socket
from .net.rules import apply_env
from .net.ucspi import peer_address, unmap, variables
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup
from .serve.forkserver import PAUSING_ERRORS, ForkServer

ENVIRONMENT = (
    *options.SERVER_ENVIRONMENT,
    *options.ENVID_ENVIRONMENT,
    ("LISTEN_FDS, LISTEN_PID", "systemd's listening sockets: nothing is bound"),
    *options.READINESS_ENVIRONMENT,
)
EXIT_CODES = (
    ("0", "stopped by SIGTERM, SIGINT or SIGQUIT, once the connections ended"),
    ("96", "a certificate, key or CA file that cannot be used"),
    ("100", "usage: a bad option, operand or environment variable"),
    ("111", "a system call failed, such as the bind"),
    ("126, 127", "prog cannot be executed, or is not found"),
    ("", "a connection's child exits as s6-tlsd does; -v logs it"),
)


def serve(setup: Setup) -> int:
    """Listen (or take systemd's sockets), then accept until told to stop."""
    s = setup.settings
    listeners = systemd.listening_sockets(setup.environ)
    before_tls = gate.Gate.from_settings(s)
    bound = not listeners
    if bound:
        listeners = [bound_socket(s.ip, s.port, s.family, socket.SOCK_STREAM, backlog=s.backlog)]
    return Server(setup, listeners, bound, before_tls).serve(s.notify)


class Server(ForkServer):
    """s6-tlsserver's ``ForkServer``: accept, then what comes before TLS, then TLS."""

    def __init__(
        self, setup: Setup, listeners: list[socket.socket], bound: bool, before_tls: gate.Gate
    ) -> None:
        super().__init__(setup, listeners, bound)
        self.gate = before_tls

    def on_listener(self, listener: socket.socket) -> None:
        if not self.ready_for_peer():
            return  # paused: the connection waits in the backlog
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            self.trouble_with("unable to accept", exc, exc.errno in PAUSING_ERRORS)
            return
        self.trouble_over()
        ip = unmap(addr[0])
        if not self.admits(ip, peer_address(ip, addr[1])):
            conn.close()
            return
        self.start_child(conn, variables("TCP", conn.getsockname(), addr), ip, addr[1])

    def serve_child(self, env: dict[str, str], fd: int, channel: socket.socket) -> int:
        return self.serve_peer(self._admit(fd, env), env, fd, channel)

    def _admit(self, fd: int, env: dict[str, str]) -> Setup:
        """Before TLS, in the child: banner, PROXY header, rules (``net.gate``).

        Updates ``env`` from a PROXY header; puts the connection's variables
        and the rule's changes in this child's own environment, prog's to
        be; returns the setup to serve with (another prog for an exec rule).
        Raises what ``Gate.receive`` and ``Gate.check`` raise.
        """
        sock = socket.socket(fileno=fd)
        try:
            self.gate.receive(sock, env, self.setup.cfg.options.handshake_timeout_ms)
            admission = self.gate.check(env, self.log_for(env).warn)
        finally:
            sock.detach()
        self.setup.environ.update(env)
        apply_env(self.setup.environ, admission.env)
        if admission.exec is None:
            return self.setup
        return dataclasses.replace(self.setup, app=("execlineb", "-c", admission.exec))


PROGRAM = Program(
    name="s6-tlsserver",
    role="server",
    summary="Listen on ip port and serve each connection over TLS to a new prog.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *options.FAMILY,
        options.NOTIFY,
        *options.LIMITS,
        options.BACKLOG,
        *options.IDS,
        *options.CLOSE,
        *options.KEEP,
        options.HANDSHAKE_TIMEOUT.with_default(10000),
        options.IDLE_TIMEOUT,
        *options.KTLS,
        *options.SERVER_TLS,
        *options.GATE,
    ),
    operands=(Operand("ip", options.ip_literal), Operand("port", options.port_number)),
    serve=serve,
    environment=ENVIRONMENT,
    exit_codes=EXIT_CODES,
    issues_tickets=True,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

"""s6-tlsserver: TCP listener plus s6-tlsd, served by a pool of workers.

Everything is imported and every TLS context built once, before readiness;
then ``serve.supervisor`` forks ``--workers`` workers, each of which serves
many connections from one event loop (``serve.worker``): accept, what comes
before TLS (banner, PROXY header, access rules: ``serve.stream``), the
handshake, then the application, as s6-tlsd would.  Under systemd, the
listening sockets may come from a socket unit.  See man/s6-tlsserver.1.
"""

import socket
from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net import gate, systemd
from .net.listen import bound_socket
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup
from .serve.stream import accept
from .serve.supervisor import Supervisor, worker_count

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
    ("", "each connection ends as s6-tlsd would; -v logs its status"),
)


def serve(setup: Setup) -> int:
    """Listen (or take systemd's sockets), then supervise the workers until told to stop."""
    s = setup.settings
    listeners = systemd.listening_sockets(setup.environ)
    before_tls = gate.Gate.from_settings(s)
    bound = not listeners
    if bound:
        listeners = [bound_socket(s.ip, s.port, s.family, socket.SOCK_STREAM, backlog=s.backlog)]
    supervisor = Supervisor(setup, listeners, bound, accept, before_tls, worker_count(s.workers))
    return supervisor.serve(s.notify)


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
        options.WORKERS,
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

"""s6-dtlsserver: a UDP listener plus DTLS, served by a pool of workers.

The workers share the listening socket: each answers the ClientHellos it
reads with a stateless cookie, and gives the peers that bring it back an
association of their own, on a UDP socket connected to them
(``serve.datagram``), served from its event loop as s6-tlsserver's
connections are (``serve.worker``), retransmission timers included.  The
supervisor, the limits and the signals are s6-tlsserver's
(``serve.supervisor``).  See man/s6-dtlsserver.1.
"""

import socket
from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.listen import bound_socket
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup
from .serve.datagram import RECV_PKTINFO, receive
from .serve.supervisor import Supervisor, worker_count

ENVIRONMENT = (
    *options.SERVER_ENVIRONMENT,
    *options.DTLS_ENVIRONMENT,
    *options.ENVID_ENVIRONMENT,
    *options.READINESS_ENVIRONMENT,
)
EXIT_CODES = (
    ("0", "stopped by SIGTERM, SIGINT or SIGQUIT, once the associations ended"),
    ("96", "a certificate, key or CA file that cannot be used"),
    ("100", "usage: a bad option, operand or environment variable"),
    ("111", "a system call failed, such as the bind"),
    ("126, 127", "prog cannot be executed, or is not found"),
    ("", "each association ends as s6-tlsd would; -v logs its status"),
)


def serve(setup: Setup) -> int:
    """Bind the UDP port, then supervise the workers until told to stop."""
    s = setup.settings
    sock = bound_socket(
        s.ip,
        s.port,
        s.family,
        socket.SOCK_DGRAM,
        prepare=lambda s: s.setsockopt(*RECV_PKTINFO[s.family], 1),  # each datagram's destination
    )
    supervisor = Supervisor(setup, [sock], True, receive, None, worker_count(s.workers))
    return supervisor.serve(s.notify)


PROGRAM = Program(
    name="s6-dtlsserver",
    role="server",
    summary="Listen on UDP ip port and serve each peer over DTLS to a new prog.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *options.FAMILY,
        options.NOTIFY,
        *options.LIMITS,
        options.WORKERS,
        *options.IDS,
        *options.KEEP,
        options.HANDSHAKE_TIMEOUT.with_default(10000),
        options.DTLS_IDLE_TIMEOUT,
        *options.SERVER_TLS,
    ),
    operands=(Operand("ip", options.ip_literal), Operand("port", options.port_number)),
    serve=serve,
    environment=ENVIRONMENT,
    exit_codes=EXIT_CODES,
    issues_tickets=True,
    dtls=True,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

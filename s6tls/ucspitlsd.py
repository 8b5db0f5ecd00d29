"""s6-ucspitlsd: STARTTLS on the server side (UCSPI-TLS), under a TCP super-server.

prog runs at once with the network on its stdin/stdout; when it writes a
command on SSLCTLFD, the engine (a child of prog) performs the TLS handshake
on the same connection and prog goes on through SSLREADFD/SSLWRITEFD.
See man/s6-ucspitlsd.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.systemd import refuse_listening_sockets
from .net.ucspi import network_peer
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """Fork the engine, exec prog with the connection still on fds 0 and 1."""
    from .starttls.engine import start  # only now: a usage error does not pay for the TLS modules

    refuse_listening_sockets(setup.environ)
    start(setup, (0, 1), network_peer((0, 1), setup.environ))


PROGRAM = Program(
    name="s6-ucspitlsd",
    role="server",
    summary="Run prog on the connection on stdin and stdout; start TLS when prog asks.",
    options=(*options.TLS, *options.SERVER_TLS, options.VERBOSITY),
    serve=serve,
    environment=(*options.SERVER_ENVIRONMENT, *options.UCSPI_ENVIRONMENT),
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

"""s6-ucspitlsc: STARTTLS on the client side (UCSPI-TLS), under a UCSPI client.

prog runs at once with the network on its fds 6 and 7 (or -6/-7); when it
writes a command on SSLCTLFD, the engine (a child of prog) performs the TLS
handshake on the same connection and prog goes on through
SSLREADFD/SSLWRITEFD.  See man/s6-ucspitlsc.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.ucspi import network_peer
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """Fork the engine, exec prog with the connection still on its fds."""
    from .starttls.engine import start  # only now: a usage error does not pay for the TLS modules

    net = setup.cfg.options.app_fds
    start(setup, net, network_peer(net, setup.environ))


PROGRAM = Program(
    name="s6-ucspitlsc",
    role="client",
    summary="Run prog on the connection on fds 6 and 7; start TLS when prog asks.",
    options=(*options.TLS, *options.CLIENT_TLS, options.VERBOSITY, *options.NET_FDS),
    serve=serve,
    environment=options.CLIENT_ENVIRONMENT,
    adjust=options.fds_from_6_7,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

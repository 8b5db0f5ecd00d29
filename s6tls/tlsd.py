"""s6-tlsd: the server side of a TLS tunnel, under a TCP super-server.

Ciphertext on stdin/stdout; after the handshake, prog runs with cleartext on
its stdin/stdout and the TLS facts in its environment.  Under inetd or a
systemd socket unit with ``Accept=yes``, which set no UCSPI variable, prog
gets ``PROTO``, ``TCPREMOTEIP``... read from the socket.  See man/s6-tlsd.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.systemd import refuse_listening_sockets
from .net.ucspi import check_fds, peer_of, tcp_variables
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """The connection on fds 0 and 1, prog on the cleartext."""
    refuse_listening_sockets(setup.environ)
    check_fds((0, 1))
    extra = {} if "PROTO" in setup.environ else tcp_variables(0)
    peer = peer_of({**setup.environ, **extra})
    return setup.serve_connection(0, 1, app_fds=(0, 1), peer=peer, extra_env=extra)


PROGRAM = Program(
    name="s6-tlsd",
    role="server",
    summary="Serve TLS on stdin and stdout, then run prog with the cleartext on its own.",
    options=(*options.TLS, *options.SERVER_TLS, options.VERBOSITY),
    serve=serve,
    environment=(*options.SERVER_ENVIRONMENT, *options.UCSPI_ENVIRONMENT),
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

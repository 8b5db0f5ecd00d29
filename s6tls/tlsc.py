"""s6-tlsc: the client side of a TLS tunnel, UCSPI style.

Ciphertext on fds 6 and 7 (what s6-tcpclient and tcpclient provide); after
the handshake, prog runs with cleartext on its fds 6 and 7 (or -6/-7) and the
TLS facts in its environment.  See man/s6-tlsc.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.ucspi import network_peer
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """The connection on fds 6 and 7, prog on the cleartext."""
    peer = network_peer((6, 7), setup.environ)
    return setup.serve_connection(6, 7, app_fds=setup.cfg.options.app_fds, peer=peer)


PROGRAM = Program(
    name="s6-tlsc",
    role="client",
    summary="Speak TLS as a client on fds 6 and 7, then run prog with the cleartext on its own.",
    options=(*options.TLS, *options.CLIENT_TLS, options.VERBOSITY, *options.APP_FDS),
    serve=serve,
    environment=options.CLIENT_ENVIRONMENT,
    adjust=options.fds_from_6_7,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

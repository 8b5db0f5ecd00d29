"""s6-dtlsclient: a connected UDP socket plus DTLS, as one command.

Connects a UDP socket to host:port (which sends nothing), runs the DTLS
handshake, then runs prog with one end of a ``SOCK_SEQPACKET`` socketpair
on its fds 6 and 7, one datagram per message each way, the DTLS facts and
the UDP variables.  The server name defaults to host, as for
s6-tlsclient.  See man/s6-dtlsclient.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.dialer import Dial, connect_udp
from .net.ucspi import variables
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """Connect the UDP socket, then DTLS on it, prog on 6 and 7."""
    s = setup.settings
    dial = Dial(s.host, s.port, s.family, s.local_ip, s.local_port)
    sock = connect_udp(dial)
    return setup.serve_connected(sock, variables("UDP", sock.getsockname(), sock.getpeername()))


PROGRAM = Program(
    name="s6-dtlsclient",
    role="client",
    summary="Speak DTLS to UDP host port, and run prog with the datagrams on its fds 6 and 7.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *options.FAMILY,
        *options.LOCAL,
        *options.KEEP,
        options.HANDSHAKE_TIMEOUT.with_default(10000),
        options.DTLS_IDLE_TIMEOUT,
        *options.CLIENT_TLS,
    ),
    operands=(Operand("host", options.nonempty), Operand("port", options.port_number)),
    serve=serve,
    environment=(*options.CLIENT_ENVIRONMENT, *options.DTLS_ENVIRONMENT),
    adjust=options.servername_from_host,
    dtls=True,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

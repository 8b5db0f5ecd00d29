"""s6-tlsclient: TCP connect plus s6-tlsc, as one command.

Connects to host:port, then runs the s6-tlsc logic in-process: prog gets the
cleartext on its fds 6 (read) and 7 (write), the TLS facts and the client TCP
variables.  The server name defaults to host: a name is sent as SNI and
checked against the certificate's DNS names, an IP literal is checked against
its IP addresses.  See man/s6-tlsclient.1.
"""

from collections.abc import Sequence
from typing import NoReturn

from . import options
from .net.dialer import connect, dial_from_settings, local_names
from .net.resolver import SystemResolver
from .net.ucspi import variables
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup


def serve(setup: Setup) -> int:
    """Connect, then the connection's socket for both ciphertext fds, prog on 6 and 7."""
    s = setup.settings
    sock = connect(dial_from_settings(s))
    env = variables("TCP", sock.getsockname(), sock.getpeername())
    names = local_names(
        SystemResolver(),
        env["TCPLOCALIP"],
        env["TCPREMOTEIP"],
        dns=s.dns,
        localname=s.localname,
    )
    return setup.serve_connected(sock, {**env, **names})


PROGRAM = Program(
    name="s6-tlsclient",
    role="client",
    summary="Connect to host port, speak TLS, and run prog with the cleartext on its fds 6 and 7.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *options.FAMILY,
        *options.DIAL,
        *options.TLS,
        *options.CLIENT_TLS,
    ),
    operands=(Operand("host", options.nonempty), Operand("port", options.port_number)),
    serve=serve,
    environment=options.CLIENT_ENVIRONMENT,
    adjust=options.servername_from_host,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

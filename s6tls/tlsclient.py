"""s6-tlsclient: TCP connect plus s6-tlsc, as one command.

Connects to host:port, then runs the s6-tlsc logic in-process: prog gets the
cleartext on its fds 6 (read) and 7 (write), the TLS facts and the client TCP
variables.  The server name (SNI and verification) defaults to host when host
is not an IP literal.  See man/s6-tlsclient.1.
"""

import socket
from collections.abc import Sequence
from typing import Any, NoReturn

from . import options
from .cli import peer_address
from .config import is_ip
from .errors import SystemFailure
from .options import Operand, Opt
from .program import Program, Setup
from .program import main as run
from .tlsc import ENVIRONMENT

FAMILY = (
    Opt("family", ("-4", "--ipv4"), "connect over IPv4 only", value=4, default=None),
    Opt("family", ("-6", "--ipv6"), "connect over IPv6 only", value=6),
)
CONNECT = (
    Opt(
        "connect_timeout_ms",
        ("-t", "--timeout"),
        "give up connecting to an address after MS milliseconds (0: the system's limit)",
        arg="MS",
        parse=options.unsigned,
        default=0,
    ),
    Opt(
        "local_ip",
        ("-i", "--local-ip"),
        "connect from LOCALIP",
        arg="LOCALIP",
        parse=options.nonempty,
        default=None,
    ),
)


def adjust(values: dict[str, Any]) -> None:
    """The server name defaults to host, unless host is an IP literal."""
    if values["servername"] is None and not is_ip(values["host"]):
        values["servername"] = values["host"]


def serve(setup: Setup) -> int:
    """Connect, then the connection's socket for both ciphertext fds, prog on 6 and 7."""
    v = setup.values
    timeout = v["connect_timeout_ms"] / 1000 or None
    sock = connect(v["host"], v["port"], v["family"], timeout, v["local_ip"])
    local, remote = sock.getsockname(), sock.getpeername()
    env = {
        "PROTO": "TCP",
        "TCPREMOTEIP": remote[0],
        "TCPREMOTEPORT": str(remote[1]),
        "TCPLOCALIP": local[0],
        "TCPLOCALPORT": str(local[1]),
    }
    setup.drop_privileges()
    fd = sock.detach()
    return setup.serve_connection(
        fd,
        fd,
        app_fds=setup.cfg.options.app_fds,
        peer=peer_address(remote[0], remote[1]),
        extra_env=env,
    )


def connect(
    host: str, port: int, family: int | None, timeout: float | None, local_ip: str | None
) -> socket.socket:
    """A connected TCP socket to host:port, trying each address in turn.

    Raises ``SystemFailure`` naming the last error when no address answers.
    """
    fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family or 0, socket.AF_UNSPEC)
    try:
        addrs = socket.getaddrinfo(host, port, fam, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemFailure(f"unable to resolve {host}: {exc.strerror}") from None
    last = "no address"
    for af, kind, proto, _name, addr in addrs:
        sock = socket.socket(af, kind, proto)
        try:
            if local_ip:
                sock.bind((local_ip, 0))
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = "connection timed out" if isinstance(exc, TimeoutError) else str(exc.strerror)
            continue
        sock.settimeout(None)
        return sock
    raise SystemFailure(f"unable to connect to {host} port {port}: {last}")


PROGRAM = Program(
    name="s6-tlsclient",
    role="client",
    summary="Connect to host port, speak TLS, and run prog with the cleartext on its fds 6 and 7.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *FAMILY,
        *CONNECT,
        *options.TLS,
        *options.CLIENT_TLS,
    ),
    operands=(Operand("host", options.nonempty), Operand("port", options.port_number)),
    serve=serve,
    environment=ENVIRONMENT,
    adjust=adjust,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

"""s6-tlsclient: TCP connect plus s6-tlsc, as one command.

Connects to host:port, then runs the s6-tlsc logic in-process: prog gets the
cleartext on its fds 6 (read) and 7 (write), the TLS facts and the client TCP
variables.  The server name (SNI and verification) defaults to host when host
is not an IP literal.  See man/s6-tlsclient.1.
"""

import os
import socket
from collections.abc import Sequence

import click

from .cli import CONTEXT_SETTINGS, Log, run_main, tls_options, verbosity_flags
from .tlsc import client_options

PROG = "s6-tlsclient"
log = Log(PROG)


@click.command(context_settings=CONTEXT_SETTINGS)
@verbosity_flags
@click.option("-4", "family", flag_value=4, help="Connect over IPv4 only.")
@click.option("-6", "family", flag_value=6, help="Connect over IPv6 only.")
@click.option(
    "-t",
    "connect_timeout_ms",
    type=click.IntRange(min=0),
    default=0,
    metavar="MS",
    help="Give up connecting after MS milliseconds (0: the system's limit).",
)
@click.option("-i", "local_ip", default=None, metavar="IP", help="Bind to this local address.")
@tls_options
@client_options
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("prog", nargs=-1, required=True)
def command(
    host: str,
    port: int,
    prog: tuple[str, ...],
    family: int | None,
    connect_timeout_ms: int,
    local_ip: str | None,
    verbosity: int | None,
    **opts: object,
) -> int:
    """s6-tlsclient [options] host port prog...: connect, TLS, prog on fds 6 and 7."""
    from .config import Options, TlsConfig, is_ip
    from .context import build_context
    from .tunnel import drop_privileges, serve_connection

    verbosity = 1 if verbosity is None else verbosity
    log.verbosity = verbosity
    if opts["servername"] is None and not is_ip(host):
        opts["servername"] = host
    options = Options(verbosity=verbosity, **opts)  # type: ignore[arg-type]
    cfg = TlsConfig.from_env("client", os.environ, options)
    ctx = build_context(cfg)
    if not options.verify_cert:
        log.info("not verifying the server's certificate (--no-verify-cert)")
    sock = connect(host, port, family, connect_timeout_ms / 1000 or None, local_ip)
    local, remote = sock.getsockname(), sock.getpeername()
    env = {
        "PROTO": "TCP",
        "TCPREMOTEIP": remote[0],
        "TCPREMOTEPORT": str(remote[1]),
        "TCPLOCALIP": local[0],
        "TCPLOCALPORT": str(local[1]),
    }
    drop_privileges(cfg)
    fd = sock.detach()
    return serve_connection(
        cfg,
        ctx,
        fd,
        fd,
        prog,
        log,
        app_fds=options.app_fds,
        environ=os.environ,
        extra_env=env,
        peer=f"{remote[0]}:{remote[1]}",
    )


def connect(
    host: str, port: int, family: int | None, timeout: float | None, local_ip: str | None
) -> socket.socket:
    """A connected TCP socket to host:port, trying each address in turn.

    Raises ``SystemFailure`` naming the last error when no address answers.
    """
    from .errors import SystemFailure

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


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

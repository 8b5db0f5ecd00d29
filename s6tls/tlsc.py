"""s6-tlsc: the client side of a TLS tunnel, UCSPI style.

Ciphertext on fds 6 and 7 (what s6-tcpclient and tcpclient provide); after
the handshake, prog runs with cleartext on its fds 6 and 7 (or -6/-7) and the
TLS facts in its environment.  See man/s6-tlsc.1.
"""

import os
from collections.abc import Sequence

import click

from .cli import CONTEXT_SETTINGS, Log, common_options, run_main

PROG = "s6-tlsc"
log = Log(PROG)


def client_options(f):
    """The client-only options, shared with s6-tlsclient."""
    f = click.option(
        "-y/-Y",
        "client_cert",
        default=False,
        help="-y presents CERTFILE/KEYFILE as client certificate; -Y (default) does not.",
    )(f)
    f = click.option(
        "-k", "servername", default=None, metavar="NAME", help="SNI and name to verify."
    )(f)
    return click.option(
        "--no-verify-cert",
        "verify_cert",
        flag_value=False,
        default=True,
        help="Do not verify the server's certificate chain.",
    )(f)


@click.command(context_settings=CONTEXT_SETTINGS)
@common_options
@client_options
@click.option("-6", "app_read", type=int, default=6, metavar="FD", help="prog's read fd.")
@click.option("-7", "app_write", type=int, default=7, metavar="FD", help="prog's write fd.")
@click.argument("prog", nargs=-1, required=True)
def command(prog: tuple[str, ...], app_read: int, app_write: int, **opts: object) -> int:
    """s6-tlsc [options] [--] prog...: TLS client on fds 6 and 7 for prog."""
    from .config import Options, TlsConfig

    options = Options(app_fds=(app_read, app_write), **opts)  # type: ignore[arg-type]
    log.verbosity = options.verbosity
    cfg = TlsConfig.from_env("client", os.environ, options)
    # The TLS modules are half the start-up: a usage error does not pay for them.
    from .context import build_context
    from .tunnel import check_fds, describe_peer, drop_privileges, serve_connection

    check_fds((6, 7), "unable to check network fds")
    ctx = build_context(cfg)
    if not options.verify_cert:
        log.info("not verifying the server's certificate (--no-verify-cert)")
    drop_privileges(cfg)
    return serve_connection(
        cfg,
        ctx,
        6,
        7,
        prog,
        log,
        app_fds=options.app_fds,
        environ=os.environ,
        peer=describe_peer(6, os.environ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

"""s6-ucspitlsc: STARTTLS on the client side (UCSPI-TLS), under a UCSPI client.

prog runs at once with the network on its fds 6 and 7 (or -6/-7); when it
writes a command on SSLCTLFD, the engine (a child of prog) performs the TLS
handshake on the same connection and prog goes on through
SSLREADFD/SSLWRITEFD.  See man/s6-ucspitlsc.1.
"""

import os
from collections.abc import Sequence

import click

from .cli import CONTEXT_SETTINGS, Log, common_options, run_main
from .tlsc import client_options

PROG = "s6-ucspitlsc"
log = Log(PROG)


@click.command(context_settings=CONTEXT_SETTINGS)
@common_options
@client_options
@click.option("-6", "net_read", type=int, default=6, metavar="FD", help="Network read fd.")
@click.option("-7", "net_write", type=int, default=7, metavar="FD", help="Network write fd.")
@click.argument("prog", nargs=-1, required=True)
def command(prog: tuple[str, ...], net_read: int, net_write: int, **opts: object) -> int:
    """s6-ucspitlsc [options] [--] prog...: STARTTLS for prog, on fds 6 and 7."""
    from .config import Options, TlsConfig

    options = Options(app_fds=(net_read, net_write), **opts)  # type: ignore[arg-type]
    log.verbosity = options.verbosity
    cfg = TlsConfig.from_env("client", os.environ, options)
    from .context import build_context
    from .starttls import start
    from .tunnel import check_fds

    check_fds(options.app_fds, "unable to check network fds")
    start(cfg, build_context(cfg), prog, log, options.app_fds, os.environ)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

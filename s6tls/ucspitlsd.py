"""s6-ucspitlsd: STARTTLS on the server side (UCSPI-TLS), under a TCP super-server.

prog runs at once with the network on its stdin/stdout; when it writes a
command on SSLCTLFD, the engine (a child of prog) performs the TLS handshake
on the same connection and prog goes on through SSLREADFD/SSLWRITEFD.
See man/s6-ucspitlsd.1.
"""

import os
from collections.abc import Sequence

import click

from .cli import CONTEXT_SETTINGS, Log, common_options, run_main

PROG = "s6-ucspitlsd"
log = Log(PROG)


@click.command(context_settings=CONTEXT_SETTINGS)
@common_options
@click.option("-Y", "peer_verify", flag_value="optional", help="Ask for a client certificate.")
@click.option("-y", "peer_verify", flag_value="required", help="Require a client certificate.")
@click.option("-k", "sni_level", type=int, default=0, metavar="SNILEVEL", help="SNI level.")
@click.argument("prog", nargs=-1, required=True)
def command(prog: tuple[str, ...], **opts: object) -> int:
    """s6-ucspitlsd [options] [--] prog...: STARTTLS for prog, on stdin/stdout."""
    from .config import Options, TlsConfig

    opts["peer_verify"] = opts["peer_verify"] or "none"
    options = Options(**opts)  # type: ignore[arg-type]
    log.verbosity = options.verbosity
    cfg = TlsConfig.from_env("server", os.environ, options)
    from .context import build_context
    from .starttls import start
    from .tunnel import check_fds

    check_fds((0, 1), "unable to check network fds")
    start(cfg, build_context(cfg), prog, log, (0, 1), os.environ)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

"""s6-tlsd: the server side of a TLS tunnel, under a TCP super-server.

Ciphertext on stdin/stdout; after the handshake, prog runs with cleartext on
its stdin/stdout and the TLS facts in its environment.  See man/s6-tlsd.1.
"""

import os
from collections.abc import Sequence

import click

from .cli import CONTEXT_SETTINGS, Log, common_options, run_main

PROG = "s6-tlsd"
log = Log(PROG)


@click.command(context_settings=CONTEXT_SETTINGS)
@common_options
@click.option("-Y", "peer_verify", flag_value="optional", help="Ask for a client certificate.")
@click.option("-y", "peer_verify", flag_value="required", help="Require a client certificate.")
@click.option(
    "-k",
    "sni_level",
    type=int,
    default=0,
    metavar="SNILEVEL",
    help="0: ignore CERTFILE:name; 1: use them, fall back to CERTFILE; 2: only them.",
)
@click.argument("prog", nargs=-1, required=True)
def command(prog: tuple[str, ...], **opts: object) -> int:
    """s6-tlsd [options] [--] prog...: serve TLS on stdin/stdout for prog."""
    from .config import Options, TlsConfig

    opts["peer_verify"] = opts["peer_verify"] or "none"
    options = Options(**opts)  # type: ignore[arg-type]
    log.verbosity = options.verbosity
    cfg = TlsConfig.from_env("server", os.environ, options)
    # The TLS modules are half the start-up: a usage error does not pay for them.
    from .context import build_context
    from .tunnel import check_fds, describe_peer, drop_privileges, serve_connection

    check_fds((0, 1), "unable to check network fds")
    ctx = build_context(cfg)
    drop_privileges(cfg)
    return serve_connection(
        cfg,
        ctx,
        0,
        1,
        prog,
        log,
        app_fds=(0, 1),
        environ=os.environ,
        peer=describe_peer(0, os.environ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

"""s6-tlsc: the client side of a TLS tunnel, UCSPI style.

Ciphertext on fds 6 and 7 (what s6-tcpclient and tcpclient provide); after
the handshake, prog runs with cleartext on its fds 6 and 7 (or -6/-7) and the
TLS facts in its environment.  See man/s6-tlsc.1.
"""

from collections.abc import Sequence
from typing import Any, NoReturn

from . import options
from .net.ucspi import network_peer
from .options import Opt
from .program import Program, Setup
from .program import main as run

ENVIRONMENT = (
    ("CAFILE, CADIR", "trust anchors to verify the server (one is needed)"),
    ("CERTFILE, KEYFILE", "the client certificate and key, with -y"),
    ("TLS_UID, TLS_GID", "numeric ids to run as after reading the keys (root only)"),
    ("TLS_*, PSKFILE, CRLFILE...", "TLS policy: versions, suites, ALPN, allow-lists (man page)"),
)
APP_FDS = (
    Opt(
        "app_read",
        ("-6", "--read-fd"),
        "prog reads the cleartext on FD",
        arg="FD",
        parse=options.unsigned,
        default=6,
    ),
    Opt(
        "app_write",
        ("-7", "--write-fd"),
        "prog writes the cleartext on FD",
        arg="FD",
        parse=options.unsigned,
        default=7,
    ),
)


def adjust(values: dict[str, Any]) -> None:
    """-6 and -7 make ``app_fds``."""
    values["app_fds"] = (values.pop("app_read"), values.pop("app_write"))


def serve(setup: Setup) -> int:
    """The connection on fds 6 and 7, prog on the cleartext."""
    peer = network_peer((6, 7))
    return setup.serve_connection(6, 7, app_fds=setup.cfg.options.app_fds, peer=peer)


PROGRAM = Program(
    name="s6-tlsc",
    role="client",
    summary="Speak TLS as a client on fds 6 and 7, then run prog with the cleartext on its own.",
    options=(*options.TLS, *options.CLIENT_TLS, options.VERBOSITY, *APP_FDS),
    serve=serve,
    environment=ENVIRONMENT,
    adjust=adjust,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

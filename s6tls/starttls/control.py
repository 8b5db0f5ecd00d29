"""The UCSPI-TLS control protocol of s6-ucspitlsd and s6-ucspitlsc, with no I/O.

The application (prog) talks cleartext on the network, then starts TLS by
writing one command byte to its control socket (``SSLCTLFD``):

- ``Y``: start TLS, and send me the TLS facts when the handshake is done;
- ``y``: start TLS, send me nothing (the control socket is closed at once);
- EOF (prog closed the socket or died without a command): TLS is declined.

After ``Y`` the engine writes the *notification block*: for each of the
facts below, in this order (s6-networking's five, then the ALPN protocol),
``KEY=value`` followed by a NUL byte, or ``KEY`` alone and a NUL for a fact
that is unset; then one more NUL.  Any other command byte is a usage error
(exit 100).
"""

import enum
from collections.abc import Mapping

from ..errors import UsageError

# The facts of the notification block, in the order they are sent.
NOTIFIED_FACTS = (
    "SSL_PROTOCOL",
    "SSL_CIPHER",
    "SSL_TLS_SNI_SERVERNAME",
    "SSL_PEER_CERT_HASH",
    "SSL_PEER_CERT_SUBJECT",
    "SSL_ALPN_PROTOCOL",
)


class Command(enum.Enum):
    """What the application asked for on its control socket."""

    DECLINE = b""
    NOTIFY = b"Y"
    QUIET = b"y"


def parse_command(data: bytes) -> Command:
    """The command in ``data``, the (at most one) byte read from the control socket.

    Raises ``UsageError`` for any byte other than ``Y`` and ``y``.
    """
    try:
        return Command(bytes(data[:1]))
    except ValueError:
        raise UsageError("unrecognized command on control socket") from None


def encode_notification(facts: Mapping[str, str]) -> bytes:
    """The notification block for ``facts`` (an empty value counts as unset).

    Raises ``ValueError`` if a value contains a NUL byte, which the block
    cannot carry.
    """
    out = bytearray()
    for key in NOTIFIED_FACTS:
        value = facts.get(key, "")
        if "\0" in value:
            raise ValueError(f"{key} contains a NUL byte")
        out += f"{key}={value}".encode() if value else key.encode()
        out += b"\0"
    return bytes(out + b"\0")

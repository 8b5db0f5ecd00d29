"""What s6-tlsserver does with a connection before TLS: Nagle, banner, PROXY header, access.

s6-networking runs s6-tcpserver-access (and proxy-server for -L) between
the accept and s6-tlsd; s6tls does the same work in the worker that took
the connection, and never waits there on a client or a resolver.  In
order:

1. ``-D``: TCP_NODELAY on the socket;
2. ``-B banner``: the banner, verbatim, before anything else (before the
   rules too, as s6-tcpserver-access does);
3. ``-L``: the PROXY header, read exactly (``read_proxy_header``, as it
   comes, within ``-K``): from then on the client is the one the header
   names, for the rules, the logs and TCPREMOTEIP/TCPREMOTEPORT
   (TCPLOCALIP/TCPLOCALPORT too);
4. the access rules and the name look-ups (``Gate.check``, which waits on
   the resolver: a worker runs it in a thread of its own).

A refused client never sees a TLS byte: its connection ends before the
handshake.  The worker's ``serve.stream`` does the waiting.
``options.GATE`` are the command-line options of all this;
``Gate.from_settings`` checks what they name (the rules) once, at start.
"""

import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

from ..deadline import after_ms
from ..errors import Refused, UsageError
from ..options import Settings
from .access import AccessPolicy, Admission, admit
from .proxyproto import HeaderReader, ProxyHeader
from .resolver import SystemResolver


@dataclass(frozen=True)
class Gate:
    """The options of s6-tlsserver that act before TLS."""

    nodelay: bool = False  # -D
    banner: bytes = b""  # -B
    proxy: bool = False  # -L
    access: AccessPolicy = field(default_factory=AccessPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Gate":
        """The gate the options of ``settings`` describe; its rules checked once.

        Raises ``UsageError`` for -i with -x, ``SystemFailure`` for rules
        that cannot be read (a missing directory, a file that is no cdb).
        """
        s = settings
        if s.rules_dir and s.rules_file:
            raise UsageError("-i and -x are mutually exclusive")
        rules, kind = s.rules_dir, "directory"
        if s.rules_file:
            rules, kind = s.rules_file, "file"
        access = AccessPolicy(
            rules=rules,
            rules_kind=kind,
            dns=s.dns or s.paranoid,
            paranoid=s.paranoid,
            strict=s.strict,
            localname=s.localname,
            timeout_ms=s.lookup_timeout_ms,
        )
        access.check_rules()
        return cls(s.nodelay, s.banner, s.proxy, access)

    def prepare(self, sock: socket.socket) -> None:
        """Nagle, then the banner, on the connection's ``sock``.

        Raises ``Refused`` when the banner cannot be written at once.
        """
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.banner:
            send_banner(sock, self.banner)

    def check(self, env: Mapping[str, str], warn: Callable[[str], None]) -> Admission:
        """The access rules and name look-ups for the client ``env`` names.

        ``warn`` gets the warnings of -W.  Raises ``access.Denied`` when the
        rules refuse the client, ``Refused`` for a failed look-up under -w.
        """
        policy = self.access
        lookups = after_ms(policy.timeout_ms, time.monotonic())
        return admit(
            policy,
            policy.open_rules(),
            SystemResolver(lookups),
            env["TCPREMOTEIP"],
            env["TCPLOCALIP"],
            warn,
        )


def send_banner(sock: socket.socket, banner: bytes) -> None:
    """Write ``banner`` (at most ``BANNER_MAX`` bytes) at once; raise ``Refused`` if it cannot."""
    try:
        sent = sock.send(banner, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError) as exc:
        raise Refused(f"unable to write the banner: {exc.strerror}") from None
    if sent != len(banner):
        raise Refused("unable to write the banner: the client does not read")


def read_proxy_header(fd: int, reader: HeaderReader) -> ProxyHeader | None:
    """Read what ``fd`` holds of a PROXY header into ``reader``, not a byte more.

    Returns the header once it is whole, None while more must come (``fd``
    is non-blocking: wait until it is readable).  Raises ``Refused`` for a
    malformed header or an EOF before its end.
    """
    try:
        return reader.feed(os.read(fd, reader.max_read()))
    except BlockingIOError:
        return None
    except EOFError as exc:
        raise Refused(str(exc)) from None


def apply_proxy_header(header: ProxyHeader, env: MutableMapping[str, str]) -> None:
    """Take the client and the address it reached from ``header``, if it names them."""
    if header.source is None or header.destination is None:
        return  # LOCAL or UNKNOWN: the connection's own addresses stand
    env["TCPREMOTEIP"], port = header.source
    env["TCPREMOTEPORT"] = str(port)
    env["TCPLOCALIP"], port = header.destination
    env["TCPLOCALPORT"] = str(port)

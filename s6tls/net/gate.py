"""What s6-tlsserver does with a connection before TLS: Nagle, banner, PROXY header, access.

s6-networking runs s6-tcpserver-access (and proxy-server for -L) between
the accept and s6-tlsd; s6tls does the same work in the child that serves
the connection, so the accept loop never waits on a client or a resolver.
In order:

1. ``-D``: TCP_NODELAY on the socket;
2. ``-B banner``: the banner, verbatim, before anything else (before the
   rules too, as s6-tcpserver-access does);
3. ``-L``: the PROXY header, read exactly and within ``-K``: from then on
   the client is the one the header names, for the rules, the logs and
   TCPREMOTEIP/TCPREMOTEPORT (TCPLOCALIP/TCPLOCALPORT too);
4. the access rules and the name look-ups (``access.admit``).

A refused client never sees a TLS byte: the child ends before the handshake.
``OPTIONS`` are the command-line options of all this; ``Gate.from_values``
checks what they name (the rules) once, at start.
"""

import os
import select
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import HandshakeTimeout, Refused, UsageError
from ..options import UCSPI_TCP, Opt, nonempty, switches, unsigned
from .access import AccessPolicy, Admission, admit
from .proxyproto import HeaderReader, ProxyHeader
from .resolver import SystemResolver

BANNER_MAX = 4096  # far below a socket's send buffer: writing it never blocks


def _banner(text: str, name: str) -> bytes:
    data = os.fsencode(text)
    if len(data) > BANNER_MAX:
        raise UsageError(f"{name}: the banner is longer than {BANNER_MAX} bytes")
    return data


OPTIONS = (
    Opt("proxy", ("-L", "--proxy"), "read a PROXY protocol header (v1, v2) first", default=False),
    *switches(
        "strict",
        False,
        (("-W", "--no-strict-resolution"), False, "a failed name look-up is a warning"),
        (("-w", "--strict-resolution"), True, "a failed name look-up refuses the client"),
    ),
    *UCSPI_TCP,
    *switches(
        "paranoid",
        False,
        (("-P", "--no-paranoid"), False, "keep the client's name as found"),
        (("-p", "--paranoid"), True, "keep it only if it resolves back to the client"),
    ),
    Opt(
        "banner",
        ("-B", "--banner"),
        "write BANNER to the client first, before TLS",
        arg="BANNER",
        parse=_banner,
        default=b"",
    ),
    Opt(
        "lookup_timeout_ms",
        ("-t", "--timeout"),
        "give the name look-ups MS milliseconds (0: the resolver's limits)",
        arg="MS",
        parse=unsigned,
        default=0,
    ),
    Opt(
        "rules_dir",
        ("-i", "--rules-directory"),
        "check each client against the rules in RULESDIR",
        arg="RULESDIR",
        parse=nonempty,
        default=None,
    ),
    Opt(
        "rules_file",
        ("-x", "--rules-file"),
        "check each client against the rules in the cdb RULESFILE",
        arg="RULESFILE",
        parse=nonempty,
        default=None,
    ),
)


@dataclass(frozen=True)
class Gate:
    """The options of s6-tlsserver that act before TLS."""

    nodelay: bool = False  # -D
    banner: bytes = b""  # -B
    proxy: bool = False  # -L
    access: AccessPolicy = field(default_factory=AccessPolicy)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "Gate":
        """The gate for the parsed ``OPTIONS``; its rules checked once.

        Raises ``UsageError`` for -i with -x, ``SystemFailure`` for rules
        that cannot be read (a missing directory, a file that is no cdb).
        """
        if values["rules_dir"] and values["rules_file"]:
            raise UsageError("-i and -x are mutually exclusive")
        rules, kind = values["rules_dir"], "directory"
        if values["rules_file"]:
            rules, kind = values["rules_file"], "file"
        access = AccessPolicy(
            rules=rules,
            rules_kind=kind,
            dns=values["dns"] or values["paranoid"],
            paranoid=values["paranoid"],
            strict=values["strict"],
            localname=values["localname"],
            timeout_ms=values["lookup_timeout_ms"],
        )
        access.check_rules()
        return cls(values["nodelay"], values["banner"], values["proxy"], access)

    def receive(self, sock: socket.socket, env: MutableMapping[str, str], timeout_ms: int) -> None:
        """Nagle, banner and PROXY header: ``env`` updated from the header.

        ``timeout_ms`` (-K) bounds the wait for the header; 0 means no bound.
        Raises ``Refused`` (a malformed header), ``HandshakeTimeout`` (no
        complete header in time) and ``OSError``.
        """
        if self.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.banner:
            send_banner(sock, self.banner)
        if self.proxy:
            deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
            apply_proxy_header(read_proxy_header(sock.fileno(), deadline), env)

    def check(self, env: Mapping[str, str], warn: Callable[[str], None]) -> Admission:
        """The access rules and name look-ups for the client ``env`` names.

        ``warn`` gets the warnings of -W.  Raises ``access.Denied`` when the
        rules refuse the client, ``Refused`` for a failed look-up under -w.
        """
        policy = self.access
        lookups = time.monotonic() + policy.timeout_ms / 1000 if policy.timeout_ms else None
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


def read_proxy_header(fd: int, deadline: float | None) -> ProxyHeader:
    """Read one PROXY header from ``fd``, not a byte more, by ``deadline`` (monotonic).

    Raises ``HandshakeTimeout`` when the deadline passes first, ``Refused``
    for a malformed header or an EOF before its end.
    """
    reader = HeaderReader()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while reader.header is None:
        wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not poller.poll(wait):
            raise HandshakeTimeout("PROXY header timed out")
        try:
            reader.feed(os.read(fd, reader.max_read()))
        except BlockingIOError:
            continue  # a non-blocking socket woken for nothing
        except EOFError as exc:
            raise Refused(str(exc)) from None
    return reader.header


def apply_proxy_header(header: ProxyHeader, env: MutableMapping[str, str]) -> None:
    """Take the client and the address it reached from ``header``, if it names them."""
    if header.source is None or header.destination is None:
        return  # LOCAL or UNKNOWN: the connection's own addresses stand
    env["TCPREMOTEIP"], port = header.source
    env["TCPREMOTEPORT"] = str(port)
    env["TCPLOCALIP"], port = header.destination
    env["TCPLOCALPORT"] = str(port)

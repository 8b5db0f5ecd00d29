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
"""

import os
import select
import socket
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from .access import AccessPolicy, Admission, admit
from .errors import HandshakeTimeout, Refused
from .proxyproto import HeaderReader, ProxyHeader
from .resolver import SystemResolver

BANNER_MAX = 4096  # far below a socket's send buffer: writing it never blocks


@dataclass(frozen=True)
class Gate:
    """The options of s6-tlsserver that act before TLS."""

    nodelay: bool = False  # -D
    banner: bytes = b""  # -B
    proxy: bool = False  # -L
    access: AccessPolicy = field(default_factory=AccessPolicy)


def pass_gate(
    gate: Gate,
    sock: socket.socket,
    env: MutableMapping[str, str],
    timeout_ms: int,
    warn: Callable[[str], None],
) -> Admission:
    """Let the client on ``sock`` in, or raise; ``env`` holds its TCP variables.

    ``env`` is updated in place from a PROXY header.  ``timeout_ms`` (-K)
    bounds the wait for the header; 0 means no bound.  Returns the
    admission (environment changes for prog, the rule's exec).

    Raises ``Refused`` (a malformed header, a denied client),
    ``HandshakeTimeout`` (no complete header within -K) and ``OSError``.
    """
    if gate.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if gate.banner:
        send_banner(sock, gate.banner)
    if gate.proxy:
        deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
        apply_proxy_header(read_proxy_header(sock.fileno(), deadline), env)
    policy = gate.access
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

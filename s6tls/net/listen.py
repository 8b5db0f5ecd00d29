"""The servers' own sockets: bound to the ip and port of the command line.

``bound_socket`` makes the listening TCP socket of s6-tlsserver and the UDP
socket of s6-dtlsserver (systemd's sockets come from ``net.systemd`` instead).
"""

import socket
from collections.abc import Callable

from ..errors import SystemFailure, UsageError


def bound_socket(
    ip: str,
    port: int,
    family: int | None,
    kind: int,
    *,
    prepare: Callable[[socket.socket], None] | None = None,
    backlog: int | None = None,
) -> socket.socket:
    """A non-blocking socket of ``kind`` bound to ``ip``:``port``, listening if ``backlog``.

    ``family`` 4 or 6 checks the address; ``prepare(sock)`` sets the
    caller's options before the bind.  Raises ``UsageError`` for an address
    of the wrong family, ``SystemFailure`` if the bind fails.
    """
    v6 = check_family(ip, family)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if prepare is not None:
        prepare(sock)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(family == 6))
    try:
        sock.bind((ip, port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SystemFailure(f"unable to bind {ip} port {port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def check_family(ip: str, family: int | None) -> bool:
    """True when ``ip`` is IPv6; raise ``UsageError`` when -4 or -6 says otherwise."""
    v6 = ":" in ip
    if family is not None and (family == 6) != v6:
        raise UsageError(f"{ip} is not an IPv{family} address")
    return v6

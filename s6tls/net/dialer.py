"""s6-tlsclient's TCP side, as s6-tcpclient does it: connect, then name both ends.

``connect`` resolves the host (IP literals are taken as they are), then
tries every address in turn with the first timeout of ``-T x+y``; when
all failed, they are tried again with the second.  With a single
address, it gets both timeouts at once.  ``-t`` puts one deadline on all
of it.  ``local_names`` then fills TCPLOCALHOST and TCPREMOTEHOST from the
resolver, unless -H (or -l for the local name).
"""

import errno
import socket
import time
from dataclasses import dataclass

from ..errors import SystemFailure
from ..options import Settings
from .access import Resolver
from .resolver import LookupFailed, SystemResolver


@dataclass(frozen=True)
class Dial:
    """Where and how to connect: s6-tcpclient's options."""

    host: str
    port: int
    family: int | None = None  # -4 / -6
    local_ip: str | None = None  # -i
    local_port: int = 0  # -p
    timeouts: tuple[float, float] = (2, 58)  # -T x+y, seconds; x 0: the system's limit
    deadline: float | None = None  # -t, as a time.monotonic() value
    nodelay: bool = False  # -D


def connect(dial: Dial) -> socket.socket:
    """A connected TCP socket to ``dial.host``, as ``-T``/``-t`` allow.

    Raises ``SystemFailure`` (111) when the host cannot be resolved or no
    address answers in time, with the last reason.
    """
    addrs = resolve(dial, socket.SOCK_STREAM)
    first, second = dial.timeouts
    if len(addrs) == 1:
        first, second = (first and first + second), 0.0
    last = "no address"
    # A second round comes only when every address failed the first.
    for timeout in (first, second) if second else (first,):
        for af, addr in addrs:
            sock, last = _try(dial, af, addr, timeout)
            if sock is not None:
                return sock
    raise SystemFailure(f"unable to connect to {dial.host} port {dial.port}: {last}")


def resolve(dial: Dial, kind: int) -> list[tuple[int, tuple]]:
    """The (family, address) pairs of ``dial.host`` for ``kind`` sockets, in the resolver's order.

    Raises ``SystemFailure`` (111) when the host cannot be resolved.
    """
    fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(dial.family or 0, socket.AF_UNSPEC)
    try:
        infos = SystemResolver(dial.deadline).bounded(
            lambda: socket.getaddrinfo(dial.host, dial.port, fam, kind)
        )
    except LookupFailed as exc:
        raise SystemFailure(f"unable to resolve {dial.host}: {exc}") from None
    except socket.gaierror as exc:
        raise SystemFailure(f"unable to resolve {dial.host}: {exc.strerror}") from None
    return [(info[0], info[4]) for info in infos]


def connect_udp(dial: Dial) -> socket.socket:
    """A UDP socket connected to the first address of ``dial.host`` (nothing is sent).

    Raises ``SystemFailure`` (111) when the host cannot be resolved or the
    socket cannot be bound or connected.
    """
    af, addr = resolve(dial, socket.SOCK_DGRAM)[0]
    sock = socket.socket(af, socket.SOCK_DGRAM)
    try:
        _bind_local(sock, dial, af)
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        where = f"{dial.host} port {dial.port}"
        raise SystemFailure(f"unable to connect to {where}: {exc.strerror or exc}") from None
    return sock


def _bind_local(sock: socket.socket, dial: Dial, af: int) -> None:
    """-i and -p: bind ``sock`` to the local address and port asked for, if any."""
    if dial.local_ip or dial.local_port:
        anywhere = "::" if af == socket.AF_INET6 else "0.0.0.0"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((dial.local_ip or anywhere, dial.local_port))


def _try(dial: Dial, af: int, addr: tuple, timeout: float) -> tuple[socket.socket | None, str]:
    limit = timeout or None
    if dial.deadline is not None:
        left = dial.deadline - time.monotonic()
        if left <= 0:
            return None, "connection timed out"
        limit = min(limit, left) if limit else left
    sock = socket.socket(af, socket.SOCK_STREAM)
    try:
        _bind_local(sock, dial, af)
        sock.settimeout(limit)
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
            return None, "connection timed out"
        return None, str(exc.strerror or exc)
    sock.settimeout(None)
    if dial.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, ""


def local_names(
    resolver: Resolver, local_ip: str, remote_ip: str, *, dns: bool, localname: str | None
) -> dict[str, str]:
    """TCPLOCALHOST and TCPREMOTEHOST, for the names that are known.

    ``localname`` (-l) is taken as it is; without ``dns`` (-H) no name is
    looked up.  A name that cannot be found, or a failed look-up, is left
    out: s6-tlsclient never fails for want of a name.
    """
    names = {"TCPLOCALHOST": localname} if localname else {}
    if not dns:
        return names
    wanted = [("TCPREMOTEHOST", remote_ip)]
    if not localname:
        wanted.insert(0, ("TCPLOCALHOST", local_ip))
    for var, ip in wanted:
        try:
            name = resolver.name_of(ip)
        except LookupFailed:
            continue
        if name:
            names[var] = name.removesuffix(".")
    return names


def dial_from_settings(s: Settings) -> Dial:
    """The ``Dial`` that s6-tlsclient's options describe; -t starts now."""
    deadline = time.monotonic() + s.timeout_s if s.timeout_s else None
    return Dial(s.host, s.port, s.family, s.local_ip, s.local_port, s.timeouts, deadline, s.nodelay)

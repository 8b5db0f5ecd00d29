"""What a super-server hands over: descriptors, and the UCSPI variables.

tcpserver and s6-tcpserver give their child ``PROTO=TCP`` and the
``TCPLOCALIP``/``TCPLOCALPORT``/``TCPREMOTEIP``/``TCPREMOTEPORT`` variables;
inetd and systemd (``Accept=yes``) give only the socket.  ``tcp_variables``
reads the same facts from the socket itself.
"""

import os
import socket
import stat
from collections.abc import Mapping, Sequence

from ..errors import SystemFailure, UsageError


def peer_address(ip: str, port: int | str) -> str:
    """``1.2.3.4:443`` or ``[::1]:443``: one token, whatever the family."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# What to do when a program that serves one connection is given a listening socket.
ONE_EACH = (
    "give one connection per process (systemd: Accept=yes; systemd-socket-activate:"
    " --inetd -a; inetd: nowait), or listen with s6-tlsserver"
)
_KINDS = (
    (stat.S_ISCHR, "a character device (a terminal, /dev/null)"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISBLK, "a block device"),
)


def check_fds(fds: Sequence[int]) -> None:
    """Refuse network fds that cannot carry a connection, before any byte is read.

    Raises ``SystemFailure`` (111) for a closed descriptor: the contract is
    silent here, and skarnet's s6-tlsc dies with 111 ("unable to check
    network fds") in this case.  Raises ``UsageError`` (100) for a listening
    socket (a super-server that passes its socket instead of a connection:
    systemd's ``Accept=no``, ``systemd-socket-activate --inetd`` without
    ``-a``), which would wait for a connection nobody accepts, and for
    anything but a socket or a pipe (a terminal, /dev/null, a file), whose
    EOF would be blamed on the peer.
    """
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise SystemFailure(
                f"unable to check network fds: descriptor {fd}: {exc.strerror}"
            ) from None
        kind = next((what for test, what in _KINDS if test(mode)), None)
        if kind is not None:
            raise UsageError(
                f"{_name(fd)} is {kind}, not a socket or a pipe:"
                " run under a super-server, which gives each connection its descriptors"
            )
        if stat.S_ISSOCK(mode) and _listening(fd):
            raise UsageError(f"{_name(fd)} is a listening socket, not a connection: {ONE_EACH}")


def _name(fd: int) -> str:
    """``stdin``, ``stdout``, or ``network descriptor N``."""
    return {0: "stdin", 1: "stdout"}.get(fd, f"network descriptor {fd}")


def _listening(fd: int) -> bool:
    """True if the socket on ``fd`` listens (SO_ACCEPTCONN)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def network_peer(net: tuple[int, int], environ: Mapping[str, str]) -> str:
    """``IP:PORT`` of the peer on the network fds ``net``, checked open (``check_fds``).

    From the UCSPI variables (TCPREMOTEIP...), else from the socket on
    ``net[0]``; '' when neither says.
    """
    check_fds(net)
    return peer_of(environ) or peer_of(tcp_variables(net[0]))


def unmap(ip: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) in its IPv4 form."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def tcp_variables(fd: int) -> dict[str, str]:
    """``PROTO``, ``TCPLOCALIP``... for the TCP socket on ``fd``; {} if it is none.

    Never raises: a pipe, a Unix socket or a closed descriptor gives {}.
    """
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return {}
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return {}
        if sock.type != socket.SOCK_STREAM:
            return {}
        try:
            local, remote = sock.getsockname(), sock.getpeername()
        except OSError:
            return {}
    return variables("TCP", local, remote)


def variables(proto: str, local: tuple, remote: tuple) -> dict[str, str]:
    """``PROTO`` and its four variables (``TCPLOCALIP``... or ``UDPLOCALIP``...).

    ``local`` and ``remote`` are socket addresses; the UCSPI rule: the
    prefix of the variables is ``PROTO``'s value.
    """
    return {
        "PROTO": proto,
        f"{proto}LOCALIP": unmap(local[0]),
        f"{proto}LOCALPORT": str(local[1]),
        f"{proto}REMOTEIP": unmap(remote[0]),
        f"{proto}REMOTEPORT": str(remote[1]),
    }


def peer_of(environ: Mapping[str, str], proto: str = "TCP") -> str:
    """``IP:PORT`` of the peer from the UCSPI variables of ``proto``; '' when they are not set."""
    ip = environ.get(f"{proto}REMOTEIP", "")
    return peer_address(ip, environ.get(f"{proto}REMOTEPORT", "?")) if ip else ""

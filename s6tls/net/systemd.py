"""systemd's side of a service: listening sockets handed over, readiness told back.

``listening_sockets`` takes the sockets of a socket unit (``LISTEN_FDS``
and ``LISTEN_PID``, as ``sd_listen_fds`` reads them, from fd 3 on), which
``refuse_listening_sockets`` refuses for a program that serves one connection;
``notify`` sends a state such as ``READY=1`` to ``NOTIFY_SOCKET``
(``Type=notify``).  Both take their variables out of the environment, so
that the applications never see them.
"""

import os
import socket
from collections.abc import Mapping, MutableMapping

from ..errors import UsageError
from ..numbers import decimal
from .ucspi import ONE_EACH

FIRST_FD = 3  # SD_LISTEN_FDS_START


def listening_sockets(environ: MutableMapping[str, str]) -> list[socket.socket]:
    """The listening TCP sockets passed to this process, non-blocking; [] if none.

    Raises ``UsageError`` if ``LISTEN_FDS`` is not a number or a descriptor
    it names is not a listening TCP socket.
    """
    count, pid = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not count or pid != str(os.getpid()):
        return []
    number = decimal(count)
    if number is None:
        raise UsageError(f"LISTEN_FDS must be a number, not {count!r}")
    sockets = []
    for fd in range(FIRST_FD, FIRST_FD + number):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise UsageError(f"LISTEN_FDS: descriptor {fd} is not a socket") from None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not listening:
            raise UsageError(f"LISTEN_FDS: descriptor {fd} is not a listening TCP socket")
        sock.set_inheritable(False)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def refuse_listening_sockets(environ: Mapping[str, str]) -> None:
    """Raise ``UsageError`` (100) if systemd passed this process listening sockets.

    For the programs that serve the one connection on their stdin and
    stdout (s6-tlsd, s6-ucspitlsd): a socket unit without ``Accept=yes``
    passes its listening sockets (``LISTEN_FDS``) and no connection, so no
    client would ever be served.
    """
    if environ.get("LISTEN_FDS") and environ.get("LISTEN_PID") == str(os.getpid()):
        raise UsageError(
            f"systemd passed listening sockets (LISTEN_FDS), not a connection: {ONE_EACH}"
        )


def notify(environ: MutableMapping[str, str], state: str) -> str | None:
    """Send ``state`` to ``NOTIFY_SOCKET`` (taken out of ``environ``); None if sent or unset.

    Returns why it could not be sent, for a warning: readiness that cannot
    be told is no reason to stop serving.
    """
    address = environ.pop("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        return f"unable to notify systemd: {exc.strerror}"
    return None

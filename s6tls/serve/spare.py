"""The spare child of the fork-server: forked ahead of time, handed one peer.

The server keeps one *spare*: a child forked before a peer comes, waiting on
its end of a ``SOCK_SEQPACKET`` socketpair, its *channel*.  The protocol on
the channel, one message each way:

* server -> spare (``hand_over``): the peer's descriptor (SCM_RIGHTS) with
  its variables as JSON; a channel closed with no message retires the
  spare, which exits 0 (``receive``);
* spare -> server (``report_handshake``): ``HANDSHAKE_DONE`` once the
  peer's handshake is done, then the channel is closed, so that the server
  can tell (``in_handshake``) which children to drop at once on SIGTERM.

``fork`` makes a spare; ``warm_up`` takes, in the spare, some of the page
faults a connection would otherwise pay for.
"""

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from ..lifetime import Lifetime

if TYPE_CHECKING:
    from OpenSSL import SSL

HANDSHAKE_DONE = b"h"  # a child's report to the server, on its channel
MESSAGE_MAX = 1 << 16  # the largest message a spare takes


def fork(child_main: Callable[[socket.socket], NoReturn]) -> tuple[int, socket.socket]:
    """A new spare: (its pid, our end of its channel); ``child_main(channel)`` runs in it.

    Raises ``OSError`` from socketpair or fork; the caller says which.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        ours.close()
        child_main(theirs)  # never returns
    theirs.close()
    return pid, ours


def hand_over(channel: socket.socket, fd: int, env: dict[str, str]) -> None:
    """Send ``fd`` and ``env`` to the spare on ``channel``; raise ``OSError`` if it died."""
    socket.send_fds(channel, [json.dumps(env).encode()], [fd])


def receive(channel: socket.socket) -> tuple[dict[str, str], int] | None:
    """In the spare: wait for the peer's variables and descriptor; None when retired."""
    message, fds, _flags, _addr = socket.recv_fds(channel, MESSAGE_MAX, 1)
    if not fds:
        return None
    return json.loads(message), fds[0]


def report_handshake(channel: socket.socket) -> None:
    """In the child: tell the server that the handshake is done (SIGTERM now spares us)."""
    with contextlib.suppress(OSError):  # the server is gone: nothing to tell
        channel.send(HANDSHAKE_DONE)
    channel.close()


def in_handshake(channel: socket.socket) -> bool:
    """In the server: True if the child on ``channel`` has not reported its handshake done.

    Reads the report without waiting; the caller closes ``channel`` after a False.
    """
    try:
        report = channel.recv(16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        report = b""
    return report not in (HANDSHAKE_DONE, b"")


def warm_up(ctx: "SSL.Context") -> None:
    """Touch, ahead of the peer, the memory a connection first writes to.

    A freshly forked child shares its pages with the server until it writes
    to them.  Building (and dropping) a TLS object and the engine's buffers
    here takes some of those page faults off the connection's path.  A full
    in-memory handshake would warm more but costs more CPU than it saves
    under load (measured: 1.5x stunnel's rate with 4 clients became 1.25x).
    """
    from OpenSSL import SSL  # loaded by now (program.start): a usage error does not pay for it

    SSL.Connection(ctx, None).set_accept_state()
    Lifetime()

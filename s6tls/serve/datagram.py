"""s6-dtlsserver's associations in a worker: the cookie exchange, then one socket each.

The listening UDP socket takes every datagram of a peer no association
serves; the workers share it.  ``receive`` reads what it holds (at most
``BURST`` datagrams per wake-up): a ClientHello without a valid cookie is
answered with a HelloVerifyRequest and forgotten (``dtls.cookie``): a
forged source address costs no state and gets no amplification.  A
ClientHello that brings its cookie back proves its address: once admitted
(room for it in the worker's descriptors, -c, -C, and not a peer whose
association is already in its handshake,
whose own datagrams queued on the listener before its socket was
connected), it gets a UDP socket bound to the address the datagram came
to and connected to the peer, so that the kernel delivers that peer's
datagrams there (what others sent, caught by that socket before its
connect, is answered as the listener's), and a ``DatagramConnection``:
the handshake, on the ClientHello verified, then prog with one end of a
``SOCK_SEQPACKET`` socketpair on its stdin and stdout (``served.Served``).

Only the first record of a verified ClientHello matters to OpenSSL; a
datagram the kernel had to truncate (``MSG_TRUNC``) is dropped.
"""

import socket

from ..dtls.cookie import verify_hello
from ..net.ucspi import peer_address, unmap, variables
from .served import Served
from .worker import PAUSING_ERRORS, Worker

BURST = 64  # datagrams read from the listening socket per wake-up
DATAGRAM_MAX = 1 << 16  # more than any UDP payload: MSG_TRUNC means something is wrong
_IP_PKTINFO = 8  # not among Python's names
RECV_PKTINFO = {  # the option that gives each datagram's destination address, per family
    socket.AF_INET: (socket.IPPROTO_IP, _IP_PKTINFO),
    socket.AF_INET6: (socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO),
}
_PKTINFO = ((socket.IPPROTO_IP, _IP_PKTINFO), (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO))
_ANCILLARY = socket.CMSG_SPACE(64)


Datagram = tuple[bytes, list, int, tuple]  # what recvmsg gives: data, ancillary, flags, source


def receive(worker: Worker, listener: socket.socket) -> None:
    """Read the datagrams waiting on ``listener``: cookies, and new associations."""
    for _ in range(BURST):
        try:
            pending = [listener.recvmsg(DATAGRAM_MAX, _ANCILLARY)]
        except BlockingIOError:
            return
        except OSError as exc:
            worker.trouble_with("unable to receive", exc, exc.errno in PAUSING_ERRORS)
            return
        while pending:
            pending += _answer(worker, listener, pending.pop(0))


def _answer(worker: Worker, listener: socket.socket, datagram: Datagram) -> list[Datagram]:
    """A cookie for a ClientHello, an association for one that brings it back.

    Returns the datagrams of others that a new association's socket caught
    before it was connected: the listener's, to be answered the same way.
    """
    data, ancillary, flags, addr = datagram
    if flags & socket.MSG_TRUNC:
        return []
    reply, verified = verify_hello(worker.setup.ctx, data, addr)
    if reply:
        # From the address the datagram came to: its packet information, sent back.
        with_source = [c for c in ancillary if c[:2] in _PKTINFO]
        try:
            listener.sendmsg([reply], with_source, 0, addr)
        except OSError:
            return []  # the peer sends its ClientHello again
    return _start(worker, listener, data, ancillary, addr) if verified else []


def _start(
    worker: Worker, listener: socket.socket, hello: bytes, ancillary: list, addr: tuple
) -> list[Datagram]:
    """An association for the peer at ``addr``, on its own connected socket, if admitted.

    Returns the others' datagrams its socket caught (``connected``).
    """
    if not worker.has_room():
        return []  # full: the peer sends its ClientHello again, to another worker
    ip = unmap(addr[0])
    ticket = worker.admit(ip, addr[1], unique=True)
    if ticket is None:
        return []
    local = (_destination(listener, ancillary), listener.getsockname()[1])
    try:
        sock, strays = connected(listener.family, local, addr)
    except OSError as exc:
        worker.table.release(ticket)
        worker.trouble_with("unable to prepare a socket", exc, exc.errno in PAUSING_ERRORS)
        return []
    worker.trouble_over()
    env = variables("UDP", local, addr)
    env["UDPCONNNUM"] = str(ticket.number)
    conn = DatagramConnection(worker, ticket, peer_address(ip, addr[1]), sock.detach(), env)
    conn.hello = hello
    worker.add(conn)
    return strays


class DatagramConnection(Served):
    """A DTLS association of s6-dtlsserver: its handshake starts on the verified ClientHello."""


def _destination(listener: socket.socket, ancillary: list) -> str:
    """The address a datagram was sent to: its packet information, else the bound address."""
    for level, kind, data in ancillary:
        if (level, kind) == _PKTINFO[0] and len(data) >= 12:  # struct in_pktinfo: ipi_addr
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if (level, kind) == _PKTINFO[1] and len(data) >= 16:  # struct in6_pktinfo: ipi6_addr
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return listener.getsockname()[0]


def connected(family: int, local: tuple, remote: tuple) -> tuple[socket.socket, list[Datagram]]:
    """A UDP socket on ``local`` (the listener's port) connected to ``remote``.

    The kernel prefers a connected socket to the listener for ``remote``'s
    datagrams.  Between its bind and its connect, the socket takes what
    comes to the port from anyone, ahead of the listener: those datagrams
    are read out and returned with their packet information, as the
    listener would have had them (a peer's own is dropped: the ClientHello
    that started the association, sent again).  Raises ``OSError``.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    strays: list[Datagram] = []
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(*RECV_PKTINFO[family], 1)
        sock.bind(local)
        sock.connect(remote)
        sock.setblocking(False)
        while True:
            datagram = sock.recvmsg(DATAGRAM_MAX, _ANCILLARY)
            if datagram[3][:2] != remote[:2]:
                strays.append(datagram)
    except BlockingIOError:
        return sock, strays
    except OSError:
        sock.close()
        raise

"""s6-dtlsserver's associations in a worker: the cookie exchange, then one socket each.

The listening UDP socket takes every datagram of a peer no association
serves; the workers share it.  ``receive`` reads what it holds (at most
``BURST`` datagrams per wake-up): a ClientHello without a valid cookie is
answered with a HelloVerifyRequest and forgotten (``dtls.cookie``): a
forged source address costs no state and gets no amplification.  A
ClientHello that brings its cookie back proves its address: once admitted
(-c, -C, and not a peer whose association is already in its handshake,
whose own datagrams queued on the listener before its socket was
connected), it gets a UDP socket bound to the address the datagram came
to and connected to the peer, so that the kernel delivers that peer's
datagrams there, and a ``DatagramConnection``: the handshake, on the
ClientHello verified, then prog with one end of a ``SOCK_SEQPACKET``
socketpair on its stdin and stdout (``served.Served``).

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


def receive(worker: Worker, listener: socket.socket) -> None:
    """Read the datagrams waiting on ``listener``: cookies, and new associations."""
    for _ in range(BURST):
        try:
            data, ancillary, flags, addr = listener.recvmsg(DATAGRAM_MAX, _ANCILLARY)
        except BlockingIOError:
            return
        except OSError as exc:
            worker.trouble_with("unable to receive", exc, exc.errno in PAUSING_ERRORS)
            return
        if flags & socket.MSG_TRUNC:
            continue
        reply, verified = verify_hello(worker.setup.ctx, data, addr)
        if reply:
            # From the address the datagram came to: its packet information, sent back.
            with_source = [c for c in ancillary if c[:2] in _PKTINFO]
            try:
                listener.sendmsg([reply], with_source, 0, addr)
            except OSError:
                continue  # the peer sends its ClientHello again
        if verified:
            _start(worker, listener, data, ancillary, addr)


def _start(
    worker: Worker, listener: socket.socket, hello: bytes, ancillary: list, addr: tuple
) -> None:
    """An association for the peer at ``addr``, on its own connected socket, if admitted."""
    ip = unmap(addr[0])
    ticket = worker.admit(ip, addr[1], unique=True)
    if ticket is None:
        return
    local = (_destination(listener, ancillary), listener.getsockname()[1])
    try:
        sock = connected(listener.family, local, addr)
    except OSError as exc:
        worker.table.release(ticket)
        worker.trouble_with("unable to prepare a socket", exc, exc.errno in PAUSING_ERRORS)
        return
    worker.trouble_over()
    env = variables("UDP", local, addr)
    env["UDPCONNNUM"] = str(ticket.number)
    conn = DatagramConnection(worker, ticket, peer_address(ip, addr[1]), sock.detach(), env)
    conn.hello = hello
    worker.add(conn)


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


def connected(family: int, local: tuple, remote: tuple) -> socket.socket:
    """A UDP socket on ``local`` (the listener's port) connected to ``remote``.

    The kernel prefers a connected socket to the listener for ``remote``'s
    datagrams.  What reached this socket between its bind and its connect
    (from anyone) is dropped: a peer sends a datagram of its handshake
    again.  Raises ``OSError``.
    """
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(local)
        sock.connect(remote)
        sock.setblocking(False)
        while True:
            sock.recv(1)
    except BlockingIOError:
        return sock
    except OSError:
        sock.close()
        raise

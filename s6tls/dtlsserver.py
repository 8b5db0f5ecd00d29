"""s6-dtlsserver: a UDP listener plus DTLS, as one fork-server.

The listening socket takes every datagram of a peer no child serves.  A
ClientHello without a valid cookie is answered with a HelloVerifyRequest
and forgotten (``dtls.cookie``): a forged source address costs no state and gets
no amplification.  A ClientHello that brings its cookie back proves its
address: within the -c/-C limits, the server makes a UDP socket bound to
the address the datagram came to and connected to the peer, so that the
kernel delivers that peer's datagrams there, and hands it with the
ClientHello to a child, which does the handshake, spawns prog with one end
of a ``SOCK_SEQPACKET`` socketpair on its stdin and stdout, and pumps
(``serve.tunnel``).  The loop, the spare child, the limits and the signals are
``serve.forkserver``'s, shared with s6-tlsserver.  See man/s6-dtlsserver.1.
"""

import base64
import socket
from collections.abc import Sequence
from typing import NoReturn

from . import options
from .dtls.cookie import verify_hello
from .net.listen import bound_socket
from .net.ucspi import peer_address, unmap, variables
from .options import Operand
from .program import Program
from .program import main as run
from .serve.connection import Setup
from .serve.forkserver import PAUSING_ERRORS, ForkServer

ENVIRONMENT = (
    *options.SERVER_ENVIRONMENT,
    *options.DTLS_ENVIRONMENT,
    *options.ENVID_ENVIRONMENT,
    *options.READINESS_ENVIRONMENT,
)
EXIT_CODES = (
    ("0", "stopped by SIGTERM, SIGINT or SIGQUIT, once the associations ended"),
    ("96", "a certificate, key or CA file that cannot be used"),
    ("100", "usage: a bad option, operand or environment variable"),
    ("111", "a system call failed, such as the bind"),
    ("126, 127", "prog cannot be executed, or is not found"),
    ("", "an association's child exits as s6-tlsd does; -v logs it"),
)
BURST = 64  # datagrams read from the listening socket per wake-up
_HELLO = "hello"  # the key of the ClientHello (base64) in what a child is handed
_IP_PKTINFO = 8  # not among Python's names
_RECV_PKTINFO = {  # the option that gives each datagram's destination address, per family
    socket.AF_INET: (socket.IPPROTO_IP, _IP_PKTINFO),
    socket.AF_INET6: (socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO),
}
_PKTINFO = ((socket.IPPROTO_IP, _IP_PKTINFO), (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO))
_ANCILLARY = socket.CMSG_SPACE(64)


def serve(setup: Setup) -> int:
    """Bind the UDP port, then serve peers until told to stop."""
    s = setup.settings
    sock = bound_socket(
        s.ip,
        s.port,
        s.family,
        socket.SOCK_DGRAM,
        prepare=lambda s: s.setsockopt(*_RECV_PKTINFO[s.family], 1),  # each datagram's destination
    )
    return Server(setup, [sock], True).serve(s.notify)


class Server(ForkServer):
    """s6-dtlsserver's ``ForkServer``: datagrams, cookies, one connected socket per peer."""

    def on_listener(self, listener: socket.socket) -> None:
        for _ in range(BURST):
            try:
                data, ancillary, _flags, addr = listener.recvmsg(1 << 16, _ANCILLARY)
            except BlockingIOError:
                return
            except OSError as exc:
                self.trouble_with("unable to receive", exc, exc.errno in PAUSING_ERRORS)
                return
            ip = unmap(addr[0])
            peer = peer_address(ip, addr[1])
            if peer in self.serving:
                continue  # queued before its child's socket was connected: it resends
            reply, verified = verify_hello(self.setup.ctx, data, addr)
            if reply:
                # From the address the datagram came to: its packet information, sent back.
                with_source = [c for c in ancillary if c[:2] in _PKTINFO]
                try:
                    listener.sendmsg([reply], with_source, 0, addr)
                except OSError:
                    continue  # the peer sends its ClientHello again
            if verified and self.admits(ip, peer) and self.ready_for_peer():
                self._start(listener, data, ancillary, addr)

    def _start(self, listener: socket.socket, hello: bytes, ancillary: list, addr: tuple) -> None:
        """A child for the peer at ``addr``, on its own connected socket."""
        ip = unmap(addr[0])
        local = (_destination(listener, ancillary), listener.getsockname()[1])
        try:
            sock = connected(listener.family, local, addr)
        except OSError as exc:
            self.trouble_with("unable to prepare a socket", exc, exc.errno in PAUSING_ERRORS)
            return
        self.trouble_over()
        env = {**variables("UDP", local, addr), _HELLO: base64.b64encode(hello).decode()}
        self.start_child(sock, env, ip, addr[1])

    def serve_child(self, env: dict[str, str], fd: int, channel: socket.socket) -> int:
        hello = base64.b64decode(env.pop(_HELLO))
        return self.serve_peer(self.setup, env, fd, channel, extra_env=env, hello=hello)


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


PROGRAM = Program(
    name="s6-dtlsserver",
    role="server",
    summary="Listen on UDP ip port and serve each peer over DTLS to a new prog.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *options.FAMILY,
        options.NOTIFY,
        *options.LIMITS,
        *options.IDS,
        *options.KEEP,
        options.HANDSHAKE_TIMEOUT.with_default(10000),
        options.DTLS_IDLE_TIMEOUT,
        *options.SERVER_TLS,
    ),
    operands=(Operand("ip", options.ip_literal), Operand("port", options.port_number)),
    serve=serve,
    environment=ENVIRONMENT,
    exit_codes=EXIT_CODES,
    issues_tickets=True,
    dtls=True,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

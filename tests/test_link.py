"""The ciphertext side's failures are the peer's: 97 in the handshake, 98 after, never 111.

s6-tlsc is given network descriptors that are not one socket, so its link
works on memory BIOs (``link.BioLink``), and the test, a TLS server on their
other ends, breaks them the way the kernel reports a peer's end:

* a socketpair for reading: the test's end holds bytes s6-tlsc's end sent
  (written there before s6-tlsc started) and is closed unread, so reading
  s6-tlsc's end fails with ECONNRESET;
* a TCP connection for writing: the test resets it (SO_LINGER 0), so the
  next write fails with ECONNRESET.

Each fault comes once in the handshake (exit 97, ``peer vanished during the
handshake: ...``) and once while the application runs (exit 98,
``connection broken: ...``), with the errno's text and nothing else on stderr.

A pty (a serial line) fails with EIO once its other side is closed.  The
programs refuse a terminal as their network (``s6-tlsc: fatal: network
descriptor 6 is a character device``, 100), so the pty is tested on the
link itself, in-process: the handshake's error, and the engine's reading.
"""

import errno
import os
import pty
import select
import socket
import struct
import subprocess
import threading
import tty
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from OpenSSL import SSL
from tls_peer import TlsPeer, client_context, server_context
from ucspi_helpers import fatal, finish, spawn_tlsc_on, tcp_pair

from s6tls.errors import HandshakeError
from s6tls.link import BioLink, Link, WouldBlock, new_link
from s6tls.sizes import RECORD
from s6tls.tls.handshake import handshake
from s6tls.tls.reasons import error_reason

TIMEOUT = 30
# The application: says it runs, then waits for one line, answers it, reads to the end.
APP = ["sh", "-c", "echo ready >&7; head -n 1 <&6 >/dev/null; echo more >&7; cat <&6 >/dev/null"]


class Channel:
    """s6-tlsc's two network descriptors, the test's two ends, and how to break them."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "socketpair":
            x, y = socket.socketpair()
            x.send(b"unread")  # y never reads it: closing y resets x
            r, w = os.pipe()
            self.theirs, self.ours = (x.detach(), w), (r, y.detach())
        else:  # a TCP connection to write on, a pipe to read
            tcp, their_tcp = tcp_pair()
            r, w = os.pipe()
            self.watch = socket.socket(fileno=os.dup(their_tcp.fileno()))  # sees the reset
            self.theirs, self.ours = (r, their_tcp.detach()), (tcp.detach(), w)
        self.open = set(self.ours)

    @property
    def errno_text(self) -> str:
        return os.strerror(errno.ECONNRESET)

    def break_it(self) -> None:
        """The fault: s6-tlsc's next read (socketpair) or write (tcp) fails."""
        fd = self.ours[1] if self.kind == "socketpair" else self.ours[0]
        if self.kind == "tcp":
            linger = struct.pack("ii", 1, 0)
            socket.socket(fileno=os.dup(fd)).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        os.close(fd)  # tcp: a reset, the peer's TCP state is gone
        self.open.discard(fd)
        if self.kind == "tcp":
            poller = select.poll()
            poller.register(self.watch, select.POLLERR)
            assert poller.poll(TIMEOUT * 1000), "the reset never arrived"
            self.watch.close()

    def close(self) -> None:
        for fd in self.open:
            os.close(fd)


@contextmanager
def tlsc(channel: Channel, pki: dict[str, str]) -> Iterator[subprocess.Popen]:
    """s6-tlsc on ``channel``, killed and reaped at the end if it is still running."""
    env = {**os.environ, "CAFILE": pki["ca"]}
    proc = spawn_tlsc_on(["-k", "localhost"], APP, env, channel.theirs)
    for fd in set(channel.theirs):
        os.close(fd)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)
        channel.close()


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_a_broken_network_descriptor_in_the_handshake_is_the_peer_vanishing_97(kind, pki):
    channel = Channel(kind)
    channel.break_it()  # s6-tlsc's ClientHello, or the reading of its answer, fails
    with tlsc(channel, pki) as proc:
        code, _out, err = finish(proc, TIMEOUT)
    assert code == 97, err
    assert fatal(err, "s6-tlsc") == f"peer vanished during the handshake: {channel.errno_text}"


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_a_broken_network_descriptor_after_the_handshake_is_a_broken_connection_98(kind, pki):
    channel = Channel(kind)
    with tlsc(channel, pki) as proc:
        ctx = server_context(pki["server_cert"], pki["server_key"])
        peer = TlsPeer(ctx, channel.ours[0], server=True, wfd=channel.ours[1])  # ours to close
        peer.handshake()
        assert peer.recv(TIMEOUT) == b"ready\n"  # the application runs
        channel.break_it()
        if kind == "tcp":  # s6-tlsc writes once the application answers this line
            peer.send(b"go\n")
        code, _out, err = finish(proc, TIMEOUT)
    assert code == 98, err
    assert fatal(err, "s6-tlsc") == f"connection broken: {channel.errno_text}"


def pty_link(pki: dict[str, str]) -> tuple[Link, int]:
    """A client link on a pty's master (memory BIOs: not a socket), and the raw slave."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    ctx = client_context(pki["ca"])
    link = new_link(ctx, master, master)
    assert isinstance(link, BioLink)
    link.conn.set_connect_state()
    link.conn.set_tlsext_host_name(b"localhost")
    return link, slave


def test_a_pty_closed_in_the_handshake_is_the_peer_vanishing_97(pki):
    link, slave = pty_link(pki)
    os.close(slave)  # the line hangs up: reading the master fails with EIO
    with pytest.raises(HandshakeError) as info:
        handshake(link, TIMEOUT * 1000)
    assert str(info.value) == f"peer vanished during the handshake: {os.strerror(errno.EIO)}"
    link.close()


def test_a_pty_closed_after_the_handshake_is_a_broken_connection_98(pki):
    link, slave = pty_link(pki)
    peer = TlsPeer(server_context(pki["server_cert"], pki["server_key"]), slave, server=True)
    done = threading.Thread(target=peer.handshake)
    done.start()
    handshake(link, TIMEOUT * 1000)
    done.join(TIMEOUT)
    peer.close()  # closes the slave: the master reads EIO
    with pytest.raises(SSL.SysCallError) as info:
        while True:  # what the engine does for RECV, until the failure
            try:
                link.recv(memoryview(bytearray(RECORD)))
            except WouldBlock as wb:
                assert select.select([wb.fd], [], [], TIMEOUT)[0]
    assert error_reason(info.value) == f"connection broken: {os.strerror(errno.EIO)}"
    link.close()

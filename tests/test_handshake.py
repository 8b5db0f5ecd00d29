"""The handshake's -K deadline: checked before every step, whatever the peer does."""

import os
import socket
import weakref

import pytest
from conftest import collector_off
from engine_harness import contexts

from s6tls.errors import HandshakeTimeout
from s6tls.link import new_link
from s6tls.tls.handshake import handshake, handshake_step

# A handshake record of 16 KiB that starts a ClientHello announced as 128 KiB long.
STREAM = b"\x16\x03\x01\x40\x00" + b"\x01" + (131000).to_bytes(3, "big") + bytes(16380)


class TricklingPeer:
    """The clock of the handshake, and a peer that has one more byte ready at each look.

    Each reading of the clock advances it by 50 ms and writes the next byte
    of ``STREAM``: whenever the handshake polls, a byte is there, and the
    ClientHello never completes.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.now = 0.0
        self.sent = 0

    def __call__(self) -> float:
        os.write(self.fd, STREAM[self.sent : self.sent + 1])
        self.sent += 1
        self.now += 0.05
        return self.now


def test_the_deadline_is_checked_before_every_step_while_a_byte_is_always_ready(pki):
    sctx, _cctx = contexts(pki)
    to_server_r, to_server_w = os.pipe()
    from_server_r, from_server_w = os.pipe()
    link = new_link(sctx, to_server_r, from_server_w)
    link.conn.set_accept_state()
    peer = TricklingPeer(to_server_w)
    with pytest.raises(HandshakeTimeout):
        handshake(link, 1000, clock=peer)
    assert peer.sent < 100  # 1 s of its clock: it ended on time, the ClientHello far from done
    link.close()
    for fd in (to_server_w, from_server_r):
        os.close(fd)


def test_a_step_that_must_wait_leaves_no_reference_cycle(pki):
    """A worker steps many handshakes in one process: the WouldBlock a step returns
    holds no traceback, so that a link (and the connection whose step it was) is
    freed once dropped, not at the next full collection, which may never come."""
    sctx, _cctx = contexts(pki)
    ours, theirs = socket.socketpair()
    fd = theirs.detach()
    link = new_link(sctx, fd, fd)
    link.conn.set_accept_state()
    wait = handshake_step(link)  # no ClientHello yet
    assert wait is not None and wait.__traceback__ is None
    link.close()
    gone = weakref.ref(link)
    try:
        with collector_off():
            del link
            assert gone() is None  # freed by its last reference: no cycle
    finally:
        ours.close()

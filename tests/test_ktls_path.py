"""The kernel data path at the level the engine uses it, inside the guest.

``take_over`` between two ends of one process; the peer is OpenSSL in
userspace (on the socket, or on memory BIOs when the test must cut its
records) or another kernel end.
"""

import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time

import pytest
from ktls_helpers import keys_of, pairs, wait_for

from s6tls.errors import TlsRuntimeError
from s6tls.ktls import keys as ktls_keys
from s6tls.ktls import path as ktls_path
from s6tls.ktls import sockopts as ktls_socket
from s6tls.link import WouldBlock

pytestmark = pytest.mark.guest

TLS12, TLS13 = ktls_keys.TLS_1_2_VERSION, ktls_keys.TLS_1_3_VERSION


@pytest.fixture
def pair_factory(pki):
    with pairs(pki) as make:
        yield make


def path_of(pair, side):
    conn, sock = (pair.server, pair.ssock) if side == "server" else (pair.client, pair.csock)
    path = ktls_path.take_over(conn, sock.fileno(), sock.fileno(), conn.get_app_data())
    assert isinstance(path, ktls_path.KernelPath), path
    pair.opened.append(path.ktls)
    return path


def readable(fd):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def test_take_over_describes_the_suite(pair_factory):
    pair = pair_factory(TLS13, "TLS_CHACHA20_POLY1305_SHA256")
    assert path_of(pair, "client").describe == "TLSv1.3 CHACHA20-POLY1305"


def test_take_over_refuses_what_the_kernel_cannot_take(pair_factory, pki):
    pair = pair_factory(TLS13, "TLS_AES_128_CCM_SHA256")
    conn = pair.server
    assert ktls_path.take_over(conn, *[pair.ssock.fileno()] * 2, conn.get_app_data()) == (
        "TLSv1.3 TLS_AES_128_CCM_SHA256 is not a suite kernel TLS takes"
    )
    a, b = socket.socketpair()
    with a, b:
        assert ktls_path.take_over(conn, a.fileno(), a.fileno(), conn.get_app_data()) == (
            "the ciphertext descriptor is not a TCP socket"
        )
    r, w = os.pipe()
    try:  # records would go to the socket, not to the descriptor written to
        assert ktls_path.take_over(conn, pair.ssock.fileno(), w, conn.get_app_data()) == (
            "the ciphertext descriptors are not one socket"
        )
    finally:
        os.close(r)
        os.close(w)


def queued(fd: int) -> int:
    """The bytes waiting in the socket ``fd``, records or not (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_a_record_cut_in_pieces_does_not_wake_the_loop_until_it_is_whole(pair_factory):
    """A partial record makes poll report POLLIN although nothing can be read.

    After each ``WouldBlock`` of ``move_in``, the socket's low-water mark is
    above what it holds: poll stays quiet until more arrives, and a sleeping
    poll wakes when the record is whole.  The loop never spins on a peer
    that trickles a record.
    """
    pair = pair_factory(TLS12, "ECDHE-ECDSA-AES128-GCM-SHA256", server_bio=True)
    path = path_of(pair, "client")
    record = pair.raw_records(b"x" * 1000)
    r, w = os.pipe()
    try:
        sent = 0
        for end in (300, 600):
            pair.ssock.sendall(record[sent:end])
            sent = end
            deadline = time.monotonic() + 30
            while queued(path.fd) < sent:  # until it all arrived (loopback: at once)
                assert time.monotonic() < deadline
                time.sleep(0.001)
            assert readable(path.fd)  # the bare socket says there is something
            with pytest.raises(WouldBlock) as blocked:
                path.move_in(w)
            assert (blocked.value.fd, blocked.value.events) == (path.fd, select.POLLIN)
            assert not readable(path.fd)  # now it does not: no spinning
        finishing = threading.Timer(0.2, pair.ssock.sendall, (record[sent:],))
        finishing.start()
        started = time.monotonic()
        wait_for(path.fd, select.POLLIN)  # a sleeping poll wakes when the record is whole
        assert time.monotonic() - started < 10
        finishing.join()
        assert path.move_in(w) == 1000
        assert os.read(r, 2000) == b"x" * 1000
        pair.ssock.sendall(pair.raw_records(b"y"))
        wait_for(path.fd, select.POLLIN)  # the mark is back to one byte
        assert path.move_in(w) == 1
    finally:
        os.close(r)
        os.close(w)


def test_a_full_pipe_waits_on_the_pipe_and_an_empty_one_on_itself(pair_factory):
    pair = pair_factory(TLS13, None)
    server, client = path_of(pair, "server"), path_of(pair, "client")
    r, w = os.pipe()
    cr, cw = os.pipe()
    try:
        with pytest.raises(WouldBlock) as empty:
            server.move_out(r)
        assert (empty.value.fd, empty.value.events) == (r, select.POLLIN)
        os.write(w, b"z" * 65536)
        assert server.move_out(r) == 65536
        os.write(w, b"z" * 65536)
        assert server.move_out(r) == 65536
        os.set_blocking(cw, False)
        os.write(cw, b"f" * 65536)  # the application's input is full
        deadline = time.monotonic() + 30
        waits = []
        while not waits or waits[-1][0] != cw:
            assert time.monotonic() < deadline
            try:
                client.move_in(cw)
            except WouldBlock as wb:
                waits.append((wb.fd, wb.events))
                if wb.fd != cw:
                    wait_for(wb.fd, wb.events)
        assert waits[-1] == (cw, select.POLLOUT)
    finally:
        for fd in (r, w, cr, cw):
            os.close(fd)


def test_close_notify_and_eof_reach_the_engine(pair_factory):
    pair = pair_factory(TLS13, None)
    server, client = path_of(pair, "server"), path_of(pair, "client")
    server.notify()
    server.shut_write()
    seen = []
    r, w = os.pipe()
    try:
        while not seen or seen[-1] != 0:
            try:
                seen.append(client.move_in(w))
            except WouldBlock as wb:
                wait_for(wb.fd, wb.events)
    finally:
        os.close(r)
        os.close(w)
    assert seen == [None, None, ktls_path.PEER_CLOSE_NOTIFY, 0]  # two tickets first


def test_a_peer_sending_nonsense_gets_an_alert(pair_factory):
    pair = pair_factory(TLS13, None)
    server, client = path_of(pair, "server"), path_of(pair, "client")
    server.ktls.send_record(ktls_socket.CHANGE_CIPHER_SPEC, b"\x01")
    r, w = os.pipe()
    try:
        with pytest.raises(TlsRuntimeError, match="peer sent a record of unexpected type 20"):
            while True:
                try:
                    client.move_in(w)
                except WouldBlock as wb:
                    wait_for(wb.fd, wb.events)
        seen = []
        while not seen or seen[-1][0] != ktls_socket.ALERT:
            wait_for(server.fd, select.POLLIN)
            kind, n = server.ktls.read_record(server._scratch)
            seen.append((kind, bytes(server._scratch[:n])))
        assert seen[-1] == (ktls_socket.ALERT, bytes([2, ktls_socket.UNEXPECTED_MESSAGE]))
    finally:
        os.close(r)
        os.close(w)


def test_keys_of_both_ends_agree(pair_factory):
    pair = pair_factory(TLS12, None)
    assert keys_of(pair.server).tx.key == keys_of(pair.client).rx.key

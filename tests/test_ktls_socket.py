"""Kernel TLS at the socket level, inside the guest: keys in, records out.

Two OpenSSL connections shake hands over a real loopback TCP connection;
then one or both ends hand their keys to the kernel.  Against an end left
in userspace, what the kernel sends and receives proves the keys, the
sequence numbers and the wire format; between two kernel ends, the control
records.
"""

import contextlib
import errno
import hashlib
import os
import select
from pathlib import Path

import pytest
from ktls_helpers import CASES, IDS, pairs, wait_for
from OpenSSL import SSL

from s6tls.errors import TlsRuntimeError
from s6tls.ktls import keys as ktls_keys
from s6tls.ktls import sockopts as ktls_socket
from s6tls.ktls.sockopts import ALERT, FATAL, HANDSHAKE, KernelTls

pytestmark = pytest.mark.guest


@pytest.fixture
def pair_factory(pki):
    with pairs(pki) as make:
        yield make


def test_the_guest_kernel_has_the_tls_module_and_the_start_up_probe_finds_it():
    assert ktls_socket.kernel_refusal() is None  # loads the module, as a connection would
    assert Path("/proc/net/tls_stat").exists()
    assert os.uname().release.startswith("6.1.")


def _pump_out(ktls: KernelTls, data: bytes) -> None:
    """Splice all of ``data`` into ``ktls`` through a pipe."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    written = spliced = 0
    try:
        while spliced < len(data):
            with contextlib.suppress(BlockingIOError):
                written += os.write(w, data[written : written + 65536])
            try:
                spliced += ktls.splice_out(r, 65536)
            except BlockingIOError:
                wait_for(ktls.fd, select.POLLOUT)
    finally:
        os.close(r)
        os.close(w)


def _read_all(ktls: KernelTls) -> list[tuple[str, bytes]]:
    """Everything ``ktls`` receives up to the FIN, in order.

    Data comes through a pipe with ``splice_in``: ``("data", bytes)``; other
    records through ``read_record``: ``(what it means, b"")``.
    """
    r, w = os.pipe()
    seen: list[tuple[str, bytes]] = []
    buf = memoryview(bytearray(ktls_socket.MAX_RECORD))
    try:
        while True:
            try:
                n = ktls.splice_in(w, 65536)
            except BlockingIOError:
                wait_for(ktls.fd, select.POLLIN)
                continue
            if n == 0:
                return seen
            if n is None:
                kind, size = ktls.read_record(buf)
                seen += [(c.kind, b"") for c in ktls.records.feed(kind, bytes(buf[:size]))]
                continue
            data = b""
            while len(data) < n:
                data += os.read(r, n - len(data))
            if seen and seen[-1][0] == "data":
                data = seen.pop()[1] + data
            seen.append(("data", data))
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_kernel_sends_what_openssl_reads(pair_factory, version, cipher):
    """Server in the kernel, client in OpenSSL: keys, sequence and wire format agree."""
    pair = pair_factory(version, cipher)
    ktls = pair.kernel("server")
    data = os.urandom(200_000)
    _pump_out(ktls, data)
    got = b""
    while len(got) < len(data):
        try:
            got += pair.client.recv(65536)
        except SSL.WantReadError:
            wait_for(pair.csock.fileno(), select.POLLIN)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_kernel_reads_what_openssl_sends(pair_factory, version, cipher):
    """Client in the kernel (the TLS 1.3 server's tickets come first), server in OpenSSL."""
    pair = pair_factory(version, cipher)
    ktls = pair.kernel("client")
    data = os.urandom(200_000)
    sent = 0
    tickets = 0
    got = bytearray()
    r, w = os.pipe()
    try:
        while len(got) < len(data):
            if sent < len(data):
                with contextlib.suppress(SSL.WantWriteError):
                    sent += pair.server.send(data[sent : sent + 16384])
            try:
                n = ktls.splice_in(w, 65536)
            except BlockingIOError:
                continue
            if n is None:
                buf = memoryview(bytearray(ktls_socket.MAX_RECORD))
                kind, size = ktls.read_record(buf)
                assert kind == HANDSHAKE
                assert [c.kind for c in ktls.records.feed(kind, bytes(buf[:size]))] == ["ignore"]
                tickets += 1
                continue
            got += os.read(r, n)
    finally:
        os.close(r)
        os.close(w)
    assert bytes(got) == data
    assert tickets == (2 if version == ktls_keys.TLS_1_3_VERSION else 0)


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_close_notify_then_fin_between_two_kernel_ends(pair_factory, version, cipher):
    pair = pair_factory(version, cipher)
    server, client = pair.kernel("server"), pair.kernel("client")
    _pump_out(server, b"last words")
    server.send_alert(ktls_socket.WARNING, ktls_socket.CLOSE_NOTIFY)
    server.shutdown_write()
    tickets = [("ignore", b"")] * (2 if version == ktls_keys.TLS_1_3_VERSION else 0)
    assert _read_all(client) == [*tickets, ("data", b"last words"), ("close_notify", b"")]


def first_control(ktls: KernelTls):
    """Read records until one that is not to be ignored (the tickets come first)."""
    buf = memoryview(bytearray(ktls_socket.MAX_RECORD))
    controls = []
    while not controls or controls[-1].kind == "ignore":
        wait_for(ktls.fd, select.POLLIN)
        kind, size = ktls.read_record(buf)
        controls += ktls.records.feed(kind, bytes(buf[:size]))
    return kind, controls[-1]


def test_a_fatal_alert_is_an_error_with_its_name(pair_factory):
    pair = pair_factory(ktls_keys.TLS_1_3_VERSION, None)
    server, client = pair.kernel("server"), pair.kernel("client")
    server.send_alert(FATAL, 40)
    kind, control = first_control(client)
    assert kind == ALERT
    assert (control.kind, control.reason) == ("error", "peer sent a fatal alert: handshake_failure")


def test_a_key_update_cannot_be_followed_on_this_kernel(pair_factory):
    pair = pair_factory(ktls_keys.TLS_1_3_VERSION, None)
    server, client = pair.kernel("server"), pair.kernel("client")
    server.send_record(HANDSHAKE, ktls_socket.key_update_message(True))
    kind, control = first_control(client)
    assert (kind, control.kind, control.update_requested) == (HANDSHAKE, "key_update", True)
    with pytest.raises(TlsRuntimeError, match="cannot change keys here") as err:
        client.follow_key_update(True)
    assert os.strerror(errno.EBUSY) in str(err.value)

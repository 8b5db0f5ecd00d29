"""Kernel TLS without a kernel that has it: the records' meaning, and the fallbacks.

``Records`` is sans-IO: records in, what they mean out.  The fallback tests
run on the host, whose kernel has no ``tls`` module (the note in
/work/shared/notes/ktls.md: this machine kind's kernel lacks CONFIG_TLS).
"""

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import program
from ktls_helpers import watched_contexts
from OpenSSL import SSL
from server_helpers import start_server

from s6tls.engine import run
from s6tls.ktls import keys as ktls_keys
from s6tls.ktls import sockopts as ktls_socket
from s6tls.ktls.sockopts import ALERT, FATAL, HANDSHAKE, WARNING, KernelTls, Records, Unavailable
from s6tls.lifetime import Stats
from s6tls.link import new_link
from s6tls.selfpipe import SelfPipe
from s6tls.tls.handshake import handshake

TLS12, TLS13 = ktls_keys.TLS_1_2_VERSION, ktls_keys.TLS_1_3_VERSION


def kinds(controls):
    return [c.kind for c in controls]


def handshake_message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_close_notify_is_the_end(version):
    assert kinds(Records(version).feed(ALERT, bytes([WARNING, 0]))) == ["close_notify"]


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_a_fatal_alert_is_an_error_that_needs_no_answer(version):
    [c] = Records(version).feed(ALERT, bytes([FATAL, 20]))
    assert (c.kind, c.reason, c.alert) == ("error", "peer sent a fatal alert: bad_record_mac", None)


def test_a_warning_is_ignored_under_tls12_and_fatal_under_tls13():
    assert kinds(Records(TLS12).feed(ALERT, bytes([WARNING, 100]))) == ["ignore"]
    [c] = Records(TLS13).feed(ALERT, bytes([WARNING, 100]))
    assert (c.kind, c.reason) == ("error", "peer sent a fatal alert: no_renegotiation")
    assert kinds(Records(TLS13).feed(ALERT, bytes([WARNING, 90]))) == ["ignore"]  # user_canceled


def test_a_malformed_alert_is_a_decode_error():
    [c] = Records(TLS13).feed(ALERT, b"\x02")
    assert (c.kind, c.alert) == ("error", ktls_socket.DECODE_ERROR)


def test_tickets_are_ignored_even_split_across_records():
    records = Records(TLS13)
    two = handshake_message(4, b"t" * 200) + handshake_message(4, b"u" * 100)
    assert kinds(records.feed(HANDSHAKE, two[:150])) == []
    assert kinds(records.feed(HANDSHAKE, two[150:])) == ["ignore", "ignore"]


@pytest.mark.parametrize("requested", [False, True])
def test_a_key_update_says_whether_ours_is_wanted(requested):
    [c] = Records(TLS13).feed(HANDSHAKE, ktls_socket.key_update_message(requested))
    assert (c.kind, c.update_requested) == ("key_update", requested)
    [bad] = Records(TLS13).feed(HANDSHAKE, handshake_message(24, b"\x02"))
    assert (bad.kind, bad.alert) == ("error", ktls_socket.DECODE_ERROR)


@pytest.mark.parametrize("message", [0, 1])  # HelloRequest, ClientHello
def test_renegotiation_is_refused_with_a_warning_under_tls12(message):
    [c] = Records(TLS12).feed(HANDSHAKE, handshake_message(message, b""))
    assert (c.kind, c.reply) == ("answer", (ALERT, bytes([WARNING, 100])))
    [bad] = Records(TLS13).feed(HANDSHAKE, handshake_message(message, b""))
    assert (bad.kind, bad.alert) == ("error", ktls_socket.UNEXPECTED_MESSAGE)


def test_other_records_are_unexpected():
    [c] = Records(TLS13).feed(ktls_socket.CHANGE_CIPHER_SPEC, b"\x01")
    assert (c.kind, c.alert) == ("error", ktls_socket.UNEXPECTED_MESSAGE)
    [big] = Records(TLS13).feed(HANDSHAKE, b"\x04\xff\xff\xff")
    assert (big.kind, big.reason) == ("error", "peer sent an oversized handshake message")


# -- what cannot take kernel TLS at all ---------------------------------------


def test_only_one_tcp_socket_can_take_kernel_tls():
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b, socket.create_server(("127.0.0.1", 0)) as lis:
        with socket.create_connection(lis.getsockname()) as tcp:
            assert ktls_socket.tcp_socket(tcp.fileno(), tcp.fileno()) is None
        assert ktls_socket.tcp_socket(a.fileno(), a.fileno()) == (
            "the ciphertext descriptor is not a TCP socket"
        )
        assert ktls_socket.tcp_socket(r, w) == "the ciphertext descriptor is not a socket"
        with socket.create_connection(lis.getsockname()) as tcp:
            assert ktls_socket.tcp_socket(tcp.fileno(), a.fileno()) == (
                "the ciphertext descriptors are not one socket"
            )
    os.close(r)
    os.close(w)


@pytest.mark.skipif(Path("/proc/net/tls_stat").exists(), reason="this host's kernel has kernel TLS")
def test_a_kernel_without_the_tls_module_changes_nothing():
    keys = ktls_keys.ConnectionKeys(
        TLS13,
        ktls_keys.AES_128_GCM,
        ktls_keys.DirectionKeys(bytes(16), bytes(12), 0),
        ktls_keys.DirectionKeys(bytes(16), bytes(12), 0),
    )
    with (
        socket.create_server(("127.0.0.1", 0)) as lis,
        socket.create_connection(lis.getsockname()) as tcp,
    ):
        peer, _ = lis.accept()
        with peer:
            before = set(os.listdir("/proc/self/fd"))
            with pytest.raises(Unavailable, match=r"^this kernel has no tls module$"):
                KernelTls.install(tcp.fileno(), keys)
            assert set(os.listdir("/proc/self/fd")) == before  # its duplicate is closed
            tcp.sendall(b"still plain TCP")
            assert peer.recv(100) == b"still plain TCP"


@pytest.mark.skipif(Path("/proc/net/tls_stat").exists(), reason="this host's kernel has kernel TLS")
def test_the_start_up_probe_finds_no_tls_module_here():
    assert ktls_socket.kernel_refusal() == "this kernel has no tls module"


@pytest.mark.skipif(Path("/proc/net/tls_stat").exists(), reason="this host's kernel has kernel TLS")
def test_programs_without_the_tls_module_go_on_in_userspace_and_say_so(pki, tmp_path):
    """--ktls on this host's kernel (no CONFIG_TLS): a warning at start, then the data goes
    through and the line says why."""
    env = {
        **os.environ,
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
        "CAFILE": pki["ca"],
    }
    data = os.urandom(300_000)
    (tmp_path / "data").write_bytes(data)
    server, port = start_server(["-v", "--ktls"], ["cat"], env)
    try:
        client = subprocess.run(
            [
                *program("s6-tlsclient"),
                "-v",
                "--ktls",
                "127.0.0.1",
                str(port),
                "sh",
                "-c",
                f'cat "{tmp_path}/data" >&7 & exec 7>&-; cat <&6 >"{tmp_path}/got"; wait',
            ],
            env=env,
            capture_output=True,
            timeout=60,
        )
    finally:
        server.terminate()
        _out, server_err = server.communicate(timeout=60)
    assert client.returncode == 0, client.stderr
    assert (tmp_path / "got").read_bytes() == data
    why = "path userspace (kernel TLS: this kernel has no tls module)"
    server_err = server_err.decode()
    assert why in client.stderr.decode()
    assert why in server_err
    warning = "warning: --ktls: this kernel has no tls module: every connection's records stay"
    assert client.stderr.decode().startswith(f"s6-tlsclient: {warning}")
    assert server_err.startswith(f"s6-tlsserver: {warning}")
    assert server_err.count(warning) == 1  # at start, not per connection


def test_the_engine_keeps_an_application_on_sockets_in_userspace(pki):
    """splice needs a pipe at one end: ``run(ktls=True)`` with sockets says why not.

    Checked before the kernel is asked anything, so it holds on any kernel:
    the data then goes through userspace, both ways.
    """
    server_ctx, client_ctx = watched_contexts(pki, TLS13, None)
    with socket.create_server(("127.0.0.1", 0)) as lis:
        peer_sock = socket.create_connection(lis.getsockname(), timeout=30)
        ours, _ = lis.accept()
    fd = ours.detach()
    link = new_link(server_ctx, fd, fd)
    link.handshake_watch = ktls_keys.HandshakeWatch()
    link.conn.set_accept_state()
    peer_sock.settimeout(None)  # OpenSSL blocks; the thread is joined with a deadline
    peer = SSL.Connection(client_ctx, peer_sock)
    peer.set_connect_state()
    app, app_theirs = socket.socketpair()
    app_theirs.settimeout(30)
    cread = app.detach()
    seen = {}

    def the_peer() -> None:
        peer.do_handshake()
        peer.sendall(b"to the application")
        seen["app got"] = app_theirs.recv(100)
        app_theirs.sendall(b"to the peer")
        app_theirs.shutdown(socket.SHUT_WR)
        seen["peer got"] = peer.recv(100)
        peer_sock.shutdown(socket.SHUT_WR)
        seen["app end"] = app_theirs.recv(100)

    talker = threading.Thread(target=the_peer, daemon=True)
    talker.start()
    handshake(link, 30_000)
    stats = Stats()
    with SelfPipe() as selfpipe:
        status = run(link, (cread, os.dup(cread), selfpipe.fileno()), ktls=True, stats=stats)
    talker.join(timeout=30)
    assert not talker.is_alive()
    peer_sock.close()
    app_theirs.close()
    assert status is None
    assert seen == {"app got": b"to the application", "peer got": b"to the peer", "app end": b""}
    assert stats.path == "userspace (kernel TLS: the application's descriptors are not pipes)"

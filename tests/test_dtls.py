"""s6-dtlsserver and s6-dtlsclient with real peers and real datagrams.

The peers: ``openssl s_client -dtls1_2`` and ``gnutls-cli --udp`` against
s6-dtlsserver, s6-dtlsclient against ``openssl s_server -dtls``, the two
programs against each other, and a pyOpenSSL client (``dtls_peer``) where a
test needs to drive the association itself.  The application sees one
datagram per record on a SOCK_SEQPACKET socket, ``PROTO=UDP`` with the UDP
variables, and the facts of the handshake.
"""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import STARTED, program
from dtls_peer import (
    APPS,
    ECHO,
    DtlsClient,
    client_hello,
    forge_port_unreachable,
    free_udp_port,
    lines_until,
    memory_client,
    next_flight,
    s_server_dtls,
    stop,
)
from openssl_peer import s_client
from server_helpers import child_pids, fd_count
from test_psk import KEY, psk_server_env
from ucspi_helpers import fatal

import s6tls.serve.datagram

SIZES = [sys.executable, os.path.join(APPS, "dgram_sizes.py")]
FACTS = (
    'line=$(head -n 1); echo "got $line $PROTO $UDPLOCALIP $UDPLOCALPORT'
    ' $UDPREMOTEIP $SSL_PROTOCOL $SSL_DTLS_MAX_DATAGRAM ${CERTFILE-unset}"'
)


# -- real peers ------------------------------------------------------------------


def test_openssl_s_client_dtls1_2_talks_to_prog_which_sees_udp_and_dtls_facts(dtls_server, pki):
    proc, port = dtls_server([], ["sh", "-c", FACTS])
    peer = s_client(port, "-dtls1_2", "-CAfile", pki["ca"], "-verify_return_error",
                    input=b"hello\n")  # fmt: skip
    assert peer.protocol == "DTLSv1.2", peer.err
    words = peer.out.decode().split()
    assert words[:3] == ["got", "hello", "UDP"]
    assert words[3:] == ["127.0.0.1", str(port), "127.0.0.1", "DTLSv1.2", "1195", "unset"]
    lines = lines_until(proc, "status 0")
    assert "closed by application exited status 0" in lines[-1]


def test_gnutls_cli_udp_handshakes_and_its_close_notify_ends_prog(dtls_server, pki):
    show = 'echo "$SSL_PROTOCOL $SSL_TLS_SNI_SERVERNAME $SSL_CIPHER"; cat >/dev/null'
    proc, port = dtls_server([], ["sh", "-c", show])
    cli = subprocess.Popen(
        ["gnutls-cli", "--udp", "-p", str(port), "--x509cafile", pki["ca"], "localhost"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert cli.stdout is not None and cli.stdin is not None
    line = b""
    while line is not None and not line.startswith(b"DTLSv1.2"):
        line = cli.stdout.readline()
        assert line, "gnutls-cli ended first"
    assert line == b"DTLSv1.2 localhost ECDHE-ECDSA-AES128-GCM-SHA256\n"
    cli.stdin.close()  # gnutls-cli sends its close_notify
    assert cli.wait(timeout=30) == 0
    assert "closed by close_notify status 0" in lines_until(proc, "status")[-1]


def test_s6_dtlsclient_talks_to_openssl_s_server_dtls(pki):
    keypair = ["-cert", pki["server_cert"], "-key", pki["server_key"]]
    with s_server_dtls(*keypair, says=b"from-server\n") as (port, server):
        env = {**os.environ, "CAFILE": pki["ca"]}
        prog = ["sh", "-c", 'echo "from-client $PROTO $UDPREMOTEPORT" >&7; head -n 1 <&6']
        res = subprocess.run([*program("s6-dtlsclient"), "localhost", str(port), *prog],
                             env=env, capture_output=True, timeout=30)  # fmt: skip
        assert (res.returncode, res.stdout, res.stderr) == (0, b"from-server\n", b"")
        out, _ = server.communicate(timeout=30)
    assert f"from-client UDP {port}\n".encode() in out


def test_s6_dtlsclient_refuses_a_server_whose_name_does_not_match(dtls_server, pki):
    _proc, port = dtls_server([], ["true"])
    env = {**os.environ, "CAFILE": pki["ca"]}
    res = subprocess.run([*program("s6-dtlsclient"), "-k", "other.example", "127.0.0.1",
                          str(port), "true"], env=env, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert res.returncode == 97
    assert "certificate does not match the server name other.example" in fatal(
        res.stderr, "s6-dtlsclient"
    )


@pytest.mark.parametrize(
    ("listen", "reach"), [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"), ("::", "::1")]
)
def test_a_wildcard_listener_serves_from_the_address_it_was_reached_at(
    listen, reach, dtls_server, client_env
):
    _proc, port = dtls_server([], ["sh", "-c", 'echo "$UDPLOCALIP $UDPREMOTEIP"'], host=listen)
    res = subprocess.run([*program("s6-dtlsclient"), "-k", "localhost", reach, str(port),
                          "sh", "-c", "head -n 1 <&6"], env=client_env, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{reach} {reach}\n", "")


# -- PSK -------------------------------------------------------------------------


def test_openssl_s_client_with_a_psk_and_no_certificate(dtls_server, pskfile):
    show = ["sh", "-c", 'echo "psk=$SSL_PSK_IDENTITY $SSL_CIPHER"']
    _proc, port = dtls_server([], show, psk_server_env(pskfile))
    peer = s_client(port, "-dtls1_2", "-psk_identity", "alice", "-psk", KEY)
    assert peer.out == b"psk=alice ECDHE-PSK-CHACHA20-POLY1305\n", peer.err


def test_gnutls_cli_udp_with_a_psk(dtls_server, pskfile):
    """Plain PSK: gnutls-cli 3.7.9 crashes (SIGSEGV) once an ECDHE-PSK DTLS handshake is done."""
    show = ["sh", "-c", 'echo "psk=$SSL_PSK_IDENTITY $SSL_CIPHER"; cat >/dev/null']
    proc, port = dtls_server([], show, psk_server_env(pskfile))
    res = subprocess.run(
        ["gnutls-cli", "--udp", "-p", str(port), "127.0.0.1", "--pskusername", "alice",
         "--pskkey", KEY, "--priority", "NORMAL:-KX-ALL:+PSK"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0 and b"psk=alice PSK-AES128-GCM-SHA256\n" in res.stdout, res
    assert "closed by close_notify status 0" in lines_until(proc, "status")[-1]


def test_s6_dtlsclient_with_a_psk_against_openssl_s_server(pskfile):
    psk = ["-nocert", "-psk", KEY, "-psk_identity", "alice"]
    with s_server_dtls(*psk, says=b"psk-ok\n") as (port, _server):
        prog = ["sh", "-c", 'echo "$SSL_PSK_IDENTITY $SSL_CIPHER" >&2; head -n 1 <&6']
        env = psk_server_env(pskfile, PSK_IDENTITY="alice")
        res = subprocess.run([*program("s6-dtlsclient"), "127.0.0.1", str(port), *prog],
                             env=env, capture_output=True, timeout=30)  # fmt: skip
    assert (res.returncode, res.stdout) == (0, b"psk-ok\n"), res.stderr
    assert res.stderr == b"alice ECDHE-PSK-CHACHA20-POLY1305\n"


def test_a_wrong_psk_never_completes_the_handshake_nor_starts_prog(dtls_server, pskfile, tmp_path):
    """DTLS drops a record that fails its check without a word: both ends time out (-K)."""
    marker = tmp_path / "started"
    proc, port = dtls_server(["-K", "2000"], ["touch", str(marker)], psk_server_env(pskfile))
    wrong = tmp_path / "wrong"
    wrong.write_text(f"alice:{'ff' * 24}\n")
    wrong.chmod(0o600)
    res = subprocess.run([*program("s6-dtlsclient"), "-K", "2000", "127.0.0.1", str(port),
                          "touch", str(marker)], env=psk_server_env(str(wrong)),
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert res.returncode == 98
    assert fatal(res.stderr, "s6-dtlsclient").endswith("handshake timed out")
    lines = lines_until(proc, "status 98")
    assert any(line.endswith(": handshake timed out") for line in lines), lines
    assert not marker.exists()


def test_a_client_certificate_under_y_both_programs(dtls_server, server_env, client_env):
    show = ["sh", "-c", 'echo "$SSL_PEER_CERT_SUBJECT"']
    _proc, port = dtls_server(["-y"], show)
    prog = ["sh", "-c", "head -n 1 <&6"]
    res = subprocess.run([*program("s6-dtlsclient"), "-y", "localhost", str(port), *prog],
                         env=client_env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert res.returncode == 0 and res.stdout.endswith("/CN=client.example\n"), res.stderr
    # The twin: without -y the client shows no certificate, and -y refuses it.
    res = subprocess.run([*program("s6-dtlsclient"), "localhost", str(port), *prog],
                         env=client_env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert res.returncode == 97, res.stderr


# -- datagrams -------------------------------------------------------------------


@pytest.mark.parametrize(("mtu", "limit"), [(None, 1195), ("512", 475)])
def test_every_datagram_size_from_1_to_the_limit_keeps_its_boundaries(
    mtu, limit, dtls_server, server_env, client_env
):
    extra = {"DTLS_MTU": mtu} if mtu else {}
    _proc, port = dtls_server([], ["cat"], {**server_env, **extra})
    res = subprocess.run([*program("s6-dtlsclient"), "localhost", str(port), *SIZES],
                         env={**client_env, **extra}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == f"sizes 1..{limit} echoed, the larger one refused\n"
    assert re.fullmatch(
        rf"s6-dtlsclient: warning: peer 127.0.0.1:{port} pid \d+: refused 1 datagram\(s\) of"
        rf" prog larger than SSL_DTLS_MAX_DATAGRAM {limit} \(DTLS_MTU {mtu or 1232}\)\n",
        res.stderr,
    )


def test_empty_and_garbage_datagrams_do_not_end_the_association(dtls_server, pki):
    _proc, port = dtls_server([], ["cat"])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.sock.send(b"")  # what OpenSSL alone would read as the end of the association
    client.sock.send(b"\x17\xfe\xfd" + os.urandom(60))  # a record that fails its check
    client.sock.send(b"\x00" * 3)  # not even a record header
    client.send(b"still here")
    assert client.recv() == b"still here"
    client.close()


# -- endings ---------------------------------------------------------------------


def test_prog_ending_sends_close_notify_to_the_peer(dtls_server, pki):
    proc, port = dtls_server([], ["sh", "-c", "head -n 1 >/dev/null; echo bye"])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.send(b"hi\n")
    assert client.recv() == b"bye\n"
    assert client.recv() is None  # the close_notify
    assert "closed by application exited status 0" in lines_until(proc, "status 0")[-1]
    client.close()


def test_the_peer_close_notify_gives_prog_its_eof(dtls_server, pki, tmp_path):
    log = tmp_path / "log"
    proc, port = dtls_server([], [*ECHO, str(log)])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.send(b"one")
    assert client.recv() == b"one"
    client.close_notify()
    assert "closed by close_notify status 0" in lines_until(proc, "status")[-1]
    assert log.read_bytes() == b"3 one\n"
    client.close()


def test_an_idle_association_is_closed_both_ways(dtls_server, pki):
    proc, port = dtls_server(["--idle-timeout", "1"], ["cat"])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.send(b"ping")
    assert client.recv() == b"ping"
    assert client.recv(timeout=30) is None  # the server's close_notify, after a second
    assert "closed by idle timeout status 0" in lines_until(proc, "status")[-1]
    client.close()


def test_a_peer_whose_port_closed_is_no_ending_the_idle_timeout_ends_it(dtls_server, pki, tmp_path):
    """UDP's only news of a vanished peer, ICMP port unreachable, can be forged: no ending."""
    gone = tmp_path / "gone"
    os.mkfifo(gone)  # prog's second datagram waits for the client to be gone
    script = f"head -n 1 >/dev/null; echo one; read x <{gone}; echo two; cat >/dev/null"
    proc, port = dtls_server(["--idle-timeout", "1"], ["sh", "-c", script])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.send(b"go\n")
    assert client.recv() == b"one\n"
    client.close()  # gone, without a close_notify: "two" earns an ICMP port unreachable
    with open(gone, "w") as fifo:
        fifo.write("\n")
    lines = lines_until(proc, "status")
    assert "closed by idle timeout status 0" in lines[-1], lines
    assert not any("Connection refused" in line for line in lines), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw socket needs root")
def test_a_forged_port_unreachable_ends_no_association_on_either_side(
    dtls_server, client_env, tmp_path
):
    forged = tmp_path / "forged"
    os.mkfifo(forged)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:  # the forgery itself works
        a.bind(("127.0.0.1", 0))
        a.connect(("127.0.0.1", free_udp_port()))
        forge_port_unreachable(a.getsockname(), a.getpeername())
        with pytest.raises(ConnectionRefusedError):
            a.recv(1)
    proc, port = dtls_server([], ECHO)
    script = (
        f'echo "$UDPLOCALPORT"; echo one >&7; head -n 1 <&6; read x <{forged};'
        " echo two >&7; head -n 1 <&6"
    )
    client = subprocess.Popen(
        [*program("s6-dtlsclient"), "-k", "localhost", "127.0.0.1", str(port), "sh", "-c", script],
        env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    STARTED.append(client)
    assert client.stdout is not None
    client_port = int(client.stdout.readline())
    assert client.stdout.readline() == b"one\n"  # the association is up, both sides idle
    server_side, client_side = ("127.0.0.1", port), ("127.0.0.1", client_port)
    forge_port_unreachable(server_side, client_side)
    forge_port_unreachable(client_side, server_side)
    with open(forged, "w") as fifo:
        fifo.write("\n")
    out, err = client.communicate(timeout=30)
    assert (client.returncode, out, err) == (0, b"two\n", b"")
    lines = lines_until(proc, "status")
    assert "closed by close_notify status 0" in lines[-1], lines


def test_a_client_told_the_port_is_closed_retransmits_until_K(client_env):
    """The ICMP answer to its ClientHello may be forged: no ending, but the timeout says it."""
    res = subprocess.run(
        [*program("s6-dtlsclient"), "-K", "1500", "127.0.0.1", str(free_udp_port()), "true"],
        env=client_env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 98, res.stderr
    assert fatal(res.stderr, "s6-dtlsclient") == (
        "handshake timed out (the peer's host said: Connection refused)"
    )


def test_an_application_that_exits_without_reading_a_datagram_ends_with_its_status(
    dtls_server, pki
):
    """Its SEQPACKET socket then says ECONNRESET: the application's ending, not ours (111)."""
    exits_unread = [
        sys.executable,
        "-c",
        "import select, sys; select.select([0], [], []); sys.exit(3)",
    ]
    proc, port = dtls_server([], exits_unread)
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    client.send(b"never read\n")
    assert "closed by application exited status 3" in lines_until(proc, "status")[-1]
    assert client.recv(timeout=30) is None  # our close_notify
    client.close()


def test_a_peer_that_vanishes_mid_handshake_is_dropped_at_the_K_limit(dtls_server):
    proc, port = dtls_server(["-K", "1500"], ["true"])
    # On memory BIOs: a client on its socket may read the server's flight in the same
    # step that sends its cookie, and finish the handshake (the server is that fast).
    conn, sock = memory_client(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(20)
    sock.send(next_flight(conn))  # the ClientHello
    sock.send(next_flight(conn, sock.recv(1 << 16)))  # with its cookie: then gone
    started = time.monotonic()
    lines = lines_until(proc, "status 98")
    waited = time.monotonic() - started
    assert any(line.endswith(": handshake timed out") for line in lines), lines
    assert waited < 30  # bounded: the child did not wait for OpenSSL's own give-up
    sock.close()


# -- what the listener does ------------------------------------------------------


def test_a_forged_client_hello_gets_a_small_cookie_and_leaves_no_child_and_no_state(
    dtls_server, pki
):
    proc, port = dtls_server([], ["cat"])
    hello = client_hello()
    forgers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    before = None
    for sock in forgers:
        sock.settimeout(20)
        for _ in range(10):
            sock.sendto(hello, ("127.0.0.1", port))
            answer = sock.recv(1 << 16)
            assert answer[0] == 22 and len(answer) < len(hello)  # a HelloVerifyRequest
            # Once a worker answered, the workers are there (they come before the loop).
            before = before or state(proc.pid)
        sock.close()
    assert before is not None and all(apps == [] for _fds, apps in before.values())
    assert state(proc.pid) == before  # no application, no descriptor more
    client = DtlsClient(port, pki["ca"])  # the twin: a peer that returns its cookie
    client.handshake()
    client.send(b"x")
    assert client.recv() == b"x"  # its application runs (it may start after our handshake)
    assert sum(len(apps) for _fds, apps in state(proc.pid).values()) == 1
    client.close_notify()
    client.close()
    code, log = stop(proc)
    assert code == 0
    assert log.count("allow 127.0.0.1") == 1


def state(pid: int) -> dict[int, tuple[int, list[int]]]:
    """The server's workers: their descriptors and their applications."""
    return {w: (fd_count(w), child_pids(w)) for w in sorted(child_pids(pid))}


def test_a_hundred_associations_at_once(dtls_server, pki):
    proc, port = dtls_server(["-q", "-c", "100", "-C", "100"], ["cat"])
    clients = [DtlsClient(port, pki["ca"]) for _ in range(100)]
    deadline = time.monotonic() + 120
    while not all(c.step() for c in clients):
        assert time.monotonic() < deadline, "handshakes did not complete"
        select.select([c.sock for c in clients if not c.done], [], [], 0.1)
    for i, c in enumerate(clients):
        c.send(b"%d" % i)
    assert [c.recv() for c in clients] == [b"%d" % i for i in range(100)]
    # each with its own application, at once (they may start after their client's handshake)
    assert sum(len(apps) for _fds, apps in state(proc.pid).values()) >= 100
    for c in clients:
        c.close_notify()
        c.close()
    code, log = stop(proc)
    assert (code, log) == (0, "")


def test_C_limits_the_associations_of_one_address(dtls_server, pki):
    proc, port = dtls_server(["-C", "1"], ["cat"])
    first = DtlsClient(port, pki["ca"])
    first.handshake()
    first.send(b"running")  # past the server's handshake too: an early one would make room
    assert first.recv() == b"running"
    second = DtlsClient(port, pki["ca"])
    with pytest.raises(TimeoutError):
        second.handshake(timeout=2.5)
    line = lines_until(proc, "refused")[-1]  # the first after a quiet time, within a second
    assert re.fullmatch(
        r"s6-dtlsserver: warning: refused \d+ connections? \(\d+ over -C 1\) in the last \d+ s",
        line,
    ), line
    for c in (first, second):
        c.close()


def test_sighup_reloads_and_sigterm_lets_a_running_association_finish(dtls_server, pki):
    proc, port = dtls_server([], ["cat"])
    client = DtlsClient(port, pki["ca"])
    client.handshake()
    proc.send_signal(signal.SIGHUP)
    lines_until(proc, "reloaded the keypairs")
    proc.send_signal(signal.SIGTERM)
    lines_until(proc, "stopped accepting, 1 connection running, 0 handshakes dropped")
    client.send(b"still served")
    assert client.recv() == b"still served"
    client.close_notify()
    assert proc.wait(timeout=30) == 0
    client.close()


def test_a_session_is_resumed_by_another_child(dtls_server, pki, tmp_path):
    """Every child shares the session ticket key, as with s6-tlsserver."""
    _proc, port = dtls_server([], ["sh", "-c", 'echo "resumed=$SSL_SESSION_RESUMED"'])
    session = str(tmp_path / "session.pem")
    ca = ["-dtls1_2", "-CAfile", pki["ca"], "-verify_return_error"]
    first = s_client(port, *ca, "-sess_out", session)
    second = s_client(port, *ca, "-sess_in", session)
    assert (first.out, second.out) == (b"resumed=0\n", b"resumed=1\n"), second.err


def test_a_sixty_kilobyte_client_hello_is_answered_by_its_first_record(dtls_server, pki):
    """Only the first record of a verified ClientHello matters: 60 KB after it change nothing
    (they once travelled to a child inside a 64 KiB message, and crashed it: 111)."""
    proc, port = dtls_server(["-v", "-K", "1000"], ["cat"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(20)
    conn = memory_client()
    sock.send(next_flight(conn))
    hello = next_flight(conn, sock.recv(1 << 16))  # with its cookie
    sock.send(hello + b"\x00" * 60_000)
    answer = sock.recv(1 << 16)
    assert answer[0] == 22  # a handshake record: the server's flight
    lines = lines_until(proc, "status 98")  # then we say nothing more: -K ends it
    assert lines[-1].startswith("s6-dtlsserver: info: end 127.0.0.1 port ")
    assert not any("internal error" in line for line in lines), lines
    sock.close()
    code, log = stop(proc)
    assert code == 0 and "internal error" not in log


def test_what_others_send_while_an_association_socket_is_made_is_answered_not_lost(monkeypatch):
    """Between the bind and the connect of an association's socket, the kernel gives that
    socket, ahead of the listener, whatever comes to the port: a datagram of another peer
    sent then comes back from ``connected`` with its packet information, for the listener's
    answer; the association's own peer's is dropped (its ClientHello, sent again)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    local = listener.getsockname()
    peer, other = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    peer.bind(("127.0.0.1", 0))
    other.bind(("127.0.0.1", 0))

    class InTheWindow(socket.socket):
        def connect(self, address) -> None:  # two datagrams come between bind and connect
            peer.sendto(b"the peer again", local)
            other.sendto(b"another peer's hello", local)
            assert select.select([self], [], [], 10)[0]
            super().connect(address)

    monkeypatch.setattr(socket, "socket", InTheWindow)  # the module datagram uses
    sock, strays = s6tls.serve.datagram.connected(socket.AF_INET, local, peer.getsockname())
    monkeypatch.undo()
    assert [(data, addr) for data, _anc, _flags, addr in strays] == [
        (b"another peer's hello", other.getsockname())
    ]
    pktinfo = [c for c in strays[0][1] if c[:2] == (socket.IPPROTO_IP, 8)]
    assert socket.inet_ntoa(pktinfo[0][2][8:12]) == "127.0.0.1"  # where it was sent
    peer.sendto(b"after", local)
    assert sock.recv(100) == b"after"  # connected: the peer's datagrams come here now
    for s in (sock, listener, peer, other):
        s.close()

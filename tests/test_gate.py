"""Before TLS, in-process over real loopback sockets: banner, PROXY header, access rules."""

import threading
import time

import pytest
from test_proxyproto import CLIENT_HELLO, inet4, v2
from test_rules import write_rules
from ucspi_helpers import tcp_pair

from s6tls.errors import ExitCode, HandshakeTimeout, Refused
from s6tls.net.access import AccessPolicy
from s6tls.net.gate import Gate, read_proxy_header

DIRECT = {
    "TCPREMOTEIP": "127.0.0.1",
    "TCPREMOTEPORT": "5555",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALPORT": "443",
}


def pass_gate(gate, sock, env, timeout_ms, warn):
    """What the server's child does: receive (banner, header), then check."""
    gate.receive(sock, env, timeout_ms)
    return gate.check(env, warn)


def trickle(sock, data: bytes) -> threading.Thread:
    """Send ``data`` one byte per send() from a thread (loopback with TCP_NODELAY)."""
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run():
        for i in range(len(data)):
            sock.send(data[i : i + 1])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_trickled_header_is_read_whole_and_the_tls_bytes_stay_in_the_socket():
    server, client = tcp_pair()
    with server, client:
        header = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n"
        trickle(client, header + CLIENT_HELLO).join(10)
        env = dict(DIRECT)
        admission = pass_gate(
            Gate(proxy=True, access=AccessPolicy(dns=False)), server, env, 10000, pytest.fail
        )
        assert env == {
            "TCPREMOTEIP": "2001:db8::7",
            "TCPREMOTEPORT": "40000",
            "TCPLOCALIP": "2001:db8::1",
            "TCPLOCALPORT": "443",
        }
        assert admission.env == [
            ("TCPREMOTEINFO", None),
            ("TCPLOCALHOST", None),
            ("TCPREMOTEHOST", None),
        ]
        server.settimeout(10)
        assert server.recv(100) == CLIENT_HELLO


def test_a_local_header_keeps_the_connection_addresses():
    server, client = tcp_pair()
    with server, client:
        client.sendall(v2(0, 0, 0, b""))
        env = dict(DIRECT)
        pass_gate(Gate(proxy=True, access=AccessPolicy(dns=False)), server, env, 10000, pytest.fail)
        assert env == DIRECT


@pytest.mark.parametrize(
    "stream",
    [
        b"",  # the client connects and says nothing
        b"PROXY TCP4 192.0.2.1 192.0.2",  # half a line, then silence
        v2(1, 1, 1, inet4("192.0.2.1", "192.0.2.2", 1, 2), length=0xFFFF),  # bogus length
    ],
)
def test_a_header_that_never_completes_times_out_within_K(stream):
    server, client = tcp_pair()
    with server, client:
        client.sendall(stream)
        start = time.monotonic()
        with pytest.raises(HandshakeTimeout, match=r"^PROXY header timed out$") as info:
            read_proxy_header(server.fileno(), time.monotonic() + 0.3)
        assert 0.25 < time.monotonic() - start < 5
        assert info.value.exit_code == ExitCode.TLS


def test_eof_inside_the_header_is_a_refusal():
    server, client = tcp_pair()
    with server:
        client.sendall(b"PROXY TCP4 192.0.2.1")
        client.close()
        with pytest.raises(Refused, match="closed before the end of the PROXY header"):
            read_proxy_header(server.fileno(), time.monotonic() + 10)


def test_a_tls_client_without_header_is_refused_at_once():
    server, client = tcp_pair()
    with server, client:
        client.sendall(CLIENT_HELLO + b"\0" * 8)
        with pytest.raises(Refused, match="invalid PROXY header signature"):
            read_proxy_header(server.fileno(), None)


def test_the_banner_comes_first_even_for_a_denied_client(tmp_path):
    write_rules(tmp_path, {"ip4/127.0.0.0_8": {"deny": True}})
    gate = Gate(banner=b"220 hello\r\n", access=AccessPolicy(rules=str(tmp_path), dns=False))
    server, client = tcp_pair()
    with server, client:
        with pytest.raises(Refused, match=r"denied by rule ip4/127\.0\.0\.0_8"):
            pass_gate(gate, server, dict(DIRECT), 0, pytest.fail)
        client.settimeout(10)
        assert client.recv(100) == b"220 hello\r\n"


def test_the_rules_see_the_client_the_header_names(tmp_path):
    write_rules(tmp_path, {"ip4/127.0.0.0_8": {"allow": True}, "ip4/192.0.2.0_24": {"deny": True}})
    gate = Gate(proxy=True, access=AccessPolicy(rules=str(tmp_path), dns=False))
    server, client = tcp_pair()
    with server, client:
        client.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 443\r\n")
        with pytest.raises(Refused, match=r"denied by rule ip4/192\.0\.2\.0_24"):
            pass_gate(gate, server, dict(DIRECT), 10000, pytest.fail)


def test_no_nagle_sets_tcp_nodelay():
    import socket

    server, client = tcp_pair()
    with server, client:
        Gate().receive(server, dict(DIRECT), 0)
        assert not server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        Gate(nodelay=True).receive(server, dict(DIRECT), 0)
        assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

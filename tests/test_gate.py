"""Before TLS, in-process over real loopback sockets: banner, PROXY header, access rules.

A worker reads the PROXY header as its bytes come (``read_proxy_header``
at each wake-up, within -K: tests/test_tlsserver_access.py checks the
timeout through the server); ``wait_for_header`` here is that loop.
"""

import select
import threading
import time

import pytest
from test_proxyproto import CLIENT_HELLO, inet4, v2
from test_rules import write_rules
from ucspi_helpers import tcp_pair

from s6tls.errors import Refused
from s6tls.net.access import AccessPolicy
from s6tls.net.gate import Gate, apply_proxy_header, read_proxy_header
from s6tls.net.proxyproto import HeaderReader

DIRECT = {
    "TCPREMOTEIP": "127.0.0.1",
    "TCPREMOTEPORT": "5555",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALPORT": "443",
}


def wait_for_header(sock, timeout: float = 10.0):
    """The worker's loop for one connection: read what comes until the header is whole."""
    reader = HeaderReader()
    deadline = time.monotonic() + timeout
    while True:
        header = read_proxy_header(sock.fileno(), reader)
        if header is not None:
            return header
        left = deadline - time.monotonic()
        assert left > 0, "no complete header in time"
        select.select([sock], [], [], left)


def pass_gate(gate, sock, env, warn):
    """What a worker does before TLS: prepare (Nagle, banner), the header, then check."""
    sock.setblocking(False)
    gate.prepare(sock)
    if gate.proxy:
        apply_proxy_header(wait_for_header(sock), env)
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
            Gate(proxy=True, access=AccessPolicy(dns=False)), server, env, pytest.fail
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
        pass_gate(Gate(proxy=True, access=AccessPolicy(dns=False)), server, env, pytest.fail)
        assert env == DIRECT


@pytest.mark.parametrize(
    "stream",
    [
        b"",  # the client connects and says nothing
        b"PROXY TCP4 192.0.2.1 192.0.2",  # half a line, then silence
        v2(1, 1, 1, inet4("192.0.2.1", "192.0.2.2", 1, 2), length=0xFFFF),  # bogus length
    ],
)
def test_a_header_that_never_completes_leaves_the_worker_waiting_never_blocked(stream):
    server, client = tcp_pair()
    with server, client:
        server.setblocking(False)
        client.sendall(stream)
        reader = HeaderReader()
        select.select([server], [], [], 10 if stream else 0)
        start = time.monotonic()
        for _ in range(3):  # woken again and again: each time at once, and not done
            assert read_proxy_header(server.fileno(), reader) is None
        assert time.monotonic() - start < 1


def test_eof_inside_the_header_is_a_refusal():
    server, client = tcp_pair()
    with server:
        client.sendall(b"PROXY TCP4 192.0.2.1")
        client.close()
        with pytest.raises(Refused, match="closed before the end of the PROXY header"):
            wait_for_header(server)


def test_a_tls_client_without_header_is_refused_at_once():
    server, client = tcp_pair()
    with server, client:
        client.sendall(CLIENT_HELLO + b"\0" * 8)
        with pytest.raises(Refused, match="invalid PROXY header signature"):
            wait_for_header(server)


def test_the_banner_comes_first_even_for_a_denied_client(tmp_path):
    write_rules(tmp_path, {"ip4/127.0.0.0_8": {"deny": True}})
    gate = Gate(banner=b"220 hello\r\n", access=AccessPolicy(rules=str(tmp_path), dns=False))
    server, client = tcp_pair()
    with server, client:
        with pytest.raises(Refused, match=r"denied by rule ip4/127\.0\.0\.0_8"):
            pass_gate(gate, server, dict(DIRECT), pytest.fail)
        client.settimeout(10)
        assert client.recv(100) == b"220 hello\r\n"


def test_the_rules_see_the_client_the_header_names(tmp_path):
    write_rules(tmp_path, {"ip4/127.0.0.0_8": {"allow": True}, "ip4/192.0.2.0_24": {"deny": True}})
    gate = Gate(proxy=True, access=AccessPolicy(rules=str(tmp_path), dns=False))
    server, client = tcp_pair()
    with server, client:
        client.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 443\r\n")
        with pytest.raises(Refused, match=r"denied by rule ip4/192\.0\.2\.0_24"):
            pass_gate(gate, server, dict(DIRECT), pytest.fail)


def test_no_nagle_sets_tcp_nodelay():
    import socket

    server, client = tcp_pair()
    with server, client:
        Gate().prepare(server)
        assert not server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        Gate(nodelay=True).prepare(server)
        assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

"""s6-tlsclient's TCP side, in-process on loopback: -T x+y, -t, -i, -p, -D, the names."""

import socket
import time

import pytest
from server_helpers import full_listener
from test_access import FakeResolver

from s6tls.errors import SystemFailure, UsageError
from s6tls.net.dialer import Dial, connect, local_names
from s6tls.options import parse_timeouts


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
def full_port():
    with full_listener() as port:
        yield port


@pytest.mark.parametrize(("text", "value"), [("2+58", (2, 58)), ("5", (5, 0)), ("0+1", (0, 1))])
def test_connection_timeouts_read_as_s6_tcpclient_reads_them(text, value):
    assert parse_timeouts(text) == value


@pytest.mark.parametrize("text", ["", "+", "2+", "a+b", "2-3", "1.5+2", "2+3+4"])
def test_bad_connection_timeouts_are_a_usage_error(text):
    with pytest.raises(UsageError, match="-T must be of the form x"):
        parse_timeouts(text)


def test_local_address_port_and_nodelay(listener):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    port = listener.getsockname()[1]
    with connect(Dial("127.0.0.1", port, local_ip="127.0.0.1", local_port=free, nodelay=True)) as s:
        assert s.getsockname() == ("127.0.0.1", free)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with connect(Dial("127.0.0.1", port)) as s:
        assert not s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # -d, the default


def test_a_refused_connection_names_the_reason():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(
        SystemFailure, match=f"unable to connect to 127.0.0.1 port {port}: .*refused"
    ):
        connect(Dial("127.0.0.1", port))


def test_one_address_gets_both_timeouts_at_once(full_port):
    port = full_port
    start = time.monotonic()
    with pytest.raises(SystemFailure, match="connection timed out"):
        connect(Dial("127.0.0.1", port, timeouts=(0.2, 0.3)))
    assert 0.45 < time.monotonic() - start < 3


def test_the_global_deadline_cuts_the_connection_timeouts(full_port):
    port = full_port
    start = time.monotonic()
    with pytest.raises(SystemFailure, match="connection timed out"):
        connect(Dial("127.0.0.1", port, timeouts=(30, 0), deadline=time.monotonic() + 0.3))
    assert time.monotonic() - start < 3


def test_names_of_both_ends():
    resolver = FakeResolver({"127.0.0.1": "localhost", "192.0.2.5": "server.example."})
    assert local_names(resolver, "127.0.0.1", "192.0.2.5", dns=True, localname=None) == {
        "TCPLOCALHOST": "localhost",
        "TCPREMOTEHOST": "server.example",
    }
    assert local_names(resolver, "127.0.0.1", "192.0.2.5", dns=True, localname="me") == {
        "TCPLOCALHOST": "me",
        "TCPREMOTEHOST": "server.example",
    }
    assert local_names(resolver, "127.0.0.1", "192.0.2.5", dns=False, localname=None) == {}
    assert resolver.asked == ["127.0.0.1", "192.0.2.5", "192.0.2.5"]


def test_a_failed_name_lookup_is_no_name():
    from s6tls.net.resolver import LookupFailed

    resolver = FakeResolver({"192.0.2.5": LookupFailed("timed out")})
    assert local_names(resolver, "192.0.2.9", "192.0.2.5", dns=True, localname=None) == {}

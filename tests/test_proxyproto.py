"""The PROXY header parser, with no I/O: every well-formed kind, every malformed one.

Headers are fed the way the server reads them (``max_read()`` bytes at a
time, or one byte at a time), with the client's TLS bytes right behind, to
prove the reader never takes a byte past the header.
"""

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s6tls.errors import ExitCode
from s6tls.net.proxyproto import (
    V2_SIGNATURE,
    HeaderReader,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderUnsupported,
)

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # what follows the header


def v2(command: int, family: int, protocol: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header: signature, version 2 + command, family + protocol, length, body."""
    size = len(body) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family << 4 | protocol])
        + struct.pack("!H", size)
        + body
    )


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def read_header(stream: bytes, chunk: int | None = None) -> tuple[ProxyHeader, bytes]:
    """Feed ``stream`` as the server reads it; return the header and what is left unread."""
    reader = HeaderReader()
    pos = 0
    while reader.header is None:
        n = reader.max_read() if chunk is None else min(chunk, reader.max_read())
        reader.feed(stream[pos : pos + n])
        pos += n
    return reader.header, stream[pos:]


GOOD = [
    (
        b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n",
        ProxyHeader(1, ("192.0.2.10", 56324), ("198.51.100.1", 443)),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
        ProxyHeader(1, ("2001:db8::1", 65535), ("2001:db8::2", 0)),
    ),
    (  # an uncompressed IPv6 address is valid; prog sees the usual form
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n",
        ProxyHeader(1, ("2001:db8::1", 1), ("::1", 2)),
    ),
    (  # an IPv4-mapped address reads as IPv4, as for a direct connection
        b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1000 443\r\n",
        ProxyHeader(1, ("192.0.2.7", 1000), ("::1", 443)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1)),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",  # 56 bytes
        ProxyHeader(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (
        v2(1, 1, 1, inet4("203.0.113.5", "10.0.0.1", 40000, 443)),
        ProxyHeader(2, ("203.0.113.5", 40000), ("10.0.0.1", 443)),
    ),
    (
        v2(1, 2, 1, inet6("2001:db8::5", "2001:db8::1", 40000, 443)),
        ProxyHeader(2, ("2001:db8::5", 40000), ("2001:db8::1", 443)),
    ),
    (  # TLVs after the addresses: checked for framing, then ignored
        v2(1, 1, 1, inet4("203.0.113.5", "10.0.0.1", 1, 2) + b"\x02\x00\x03a.b" + b"\x04\x00\x00"),
        ProxyHeader(2, ("203.0.113.5", 1), ("10.0.0.1", 2)),
    ),
    (v2(0, 0, 0, b""), ProxyHeader(2)),  # LOCAL: a health check from the balancer
    (v2(0, 1, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2)), ProxyHeader(2)),  # LOCAL ignores addresses
    (v2(1, 0, 0, b"whatever"), ProxyHeader(2)),  # PROXY, family unspecified
]


@pytest.mark.parametrize(("stream", "expected"), GOOD)
@pytest.mark.parametrize("chunk", [None, 1])
def test_a_well_formed_header_is_read_exactly_and_no_further(stream, expected, chunk):
    header, rest = read_header(stream + CLIENT_HELLO, chunk)
    assert header == expected
    assert rest == CLIENT_HELLO


BAD = [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "signature"),
    (CLIENT_HELLO + b"\x00" * 8, "signature"),  # plain TLS, no header at all
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY line"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "PROXY line"),  # LF without CR
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "PROXY line"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY line"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "PROXY line"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4\x1b[2J 5.6.7.8 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n", "port"),
    (b"PROXY " + b"A" * 120 + b"\r\n", "PROXY line"),  # no CRLF within 107 bytes
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12, "command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12, "family"),
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12, "protocol"),
    (v2(1, 1, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2)[:8]), "too short"),  # bogus length: 8 < 12
    (v2(1, 2, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2)), "too short"),  # IPv6 in 12 bytes
    (v2(1, 1, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x02\x00\x05ab"), "TLV"),
    (v2(1, 1, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2) + b"\x02\x00"), "TLV"),
]


@pytest.mark.parametrize(("stream", "why"), BAD)
@pytest.mark.parametrize("chunk", [None, 1])
def test_a_malformed_header_is_refused_with_exit_1(stream, why, chunk):
    with pytest.raises(ProxyHeaderError, match=why) as info:
        read_header(stream + CLIENT_HELLO, chunk)
    assert info.value.exit_code == ExitCode.REFUSED == 1


@pytest.mark.parametrize(
    "stream",
    [
        v2(1, 3, 1, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),  # UNIX socket
        v2(1, 1, 2, inet4("1.2.3.4", "5.6.7.8", 1, 2)),  # UDP
    ],
)
def test_a_header_for_something_other_than_tcp_is_unsupported(stream):
    with pytest.raises(ProxyHeaderUnsupported, match="unsupported"):
        read_header(stream)


def test_a_bogus_v2_length_makes_the_reader_wait_for_bytes_that_never_come():
    """A header announcing more than is sent: the reader keeps asking, -K ends it."""
    reader = HeaderReader()
    stream = v2(1, 1, 1, inet4("1.2.3.4", "5.6.7.8", 1, 2), length=0xFFFF)
    reader.feed(stream[:15])
    reader.feed(stream[15:16])
    assert reader.max_read() == 0xFFFF
    reader.feed(stream[16:])
    assert reader.header is None
    assert reader.max_read() == 0xFFFF - 12


def test_eof_before_the_end_of_the_header_is_an_eof():
    reader = HeaderReader()
    reader.feed(b"PROXY TCP4 1.2.")
    with pytest.raises(EOFError):
        reader.feed(b"")


def test_a_v1_line_is_read_in_at_most_two_bytes_at_a_time_after_the_first_fifteen():
    reader = HeaderReader()
    assert reader.max_read() == 15
    reader.feed(b"PROXY TCP4 1.2.")
    assert reader.max_read() == 2
    for pair in (b"3.", b"4 ", b"5.", b"6.", b"7.", b"8 ", b"1 ", b"2\r"):
        reader.feed(pair)
    assert reader.max_read() == 1
    assert reader.feed(b"\n") == ProxyHeader(1, ("1.2.3.4", 1), ("5.6.7.8", 2))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=20))
def test_random_bytes_give_a_header_or_a_refusal_never_anything_else(stream, chunk):
    reader = HeaderReader()
    pos = 0
    try:
        while reader.header is None:
            n = min(chunk, reader.max_read())
            assert n > 0
            if pos >= len(stream):
                return  # still waiting: the -K deadline ends it
            reader.feed(stream[pos : pos + n])
            pos += n
    except ProxyHeaderError:
        return
    assert stream[:pos].startswith((b"PROXY ", V2_SIGNATURE))


@settings(max_examples=200, deadline=None)
@given(
    st.ip_addresses(v=4) | st.ip_addresses(v=6),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
)
def test_every_address_and_port_round_trips_in_both_versions(ip, sport, dport, binary):
    fam = 1 if ip.version == 4 else 2
    expected = str(ip.ipv4_mapped) if ip.version == 6 and ip.ipv4_mapped else str(ip)
    if binary:
        stream = v2(1, fam, 1, ip.packed + ip.packed + struct.pack("!HH", sport, dport))
    else:
        stream = f"PROXY TCP{ip.version} {ip} {ip} {sport} {dport}\r\n".encode()
    header, rest = read_header(stream + CLIENT_HELLO)
    assert header.source == (expected, sport)
    assert header.destination == (expected, dport)
    assert rest == CLIENT_HELLO

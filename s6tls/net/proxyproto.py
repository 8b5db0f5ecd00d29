"""The PROXY protocol header (HAProxy's, versions 1 and 2), parsed with no I/O.

A load balancer in TCP mode sends one header before the client's first
byte, saying who the client really is.  ``HeaderReader`` takes bytes in and
says how many more it may be given without reading past the header (the
bytes after it are the client's TLS ClientHello, which are not ours to
take), so the caller can read exactly the header off the socket and leave
the rest where it is:

    reader = HeaderReader()
    while (header := reader.header) is None:
        reader.feed(sock.recv(reader.max_read()))

Everything that is not a well-formed header fails closed with
``ProxyHeaderError``: a wrong signature, a line longer than 107 bytes, an
address or port that is not in canonical form, a v2 length too short for
its addresses, a truncated TLV.  A family s6tls cannot use (UNIX sockets,
datagrams) is ``ProxyHeaderUnsupported``.  ``LOCAL`` (v2) and ``UNKNOWN``
(v1) headers, and v2 headers with an unspecified family, carry no client:
the connection's own addresses stand.

The specification: haproxy's doc/proxy-protocol.txt.  TLVs are checked for
framing only; their contents (the balancer's own TLS facts, CRC32C) are
ignored, because s6tls terminates TLS itself.
"""

import ipaddress
import struct
from dataclasses import dataclass

from ..errors import Refused

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V1_MIN = 15  # b"PROXY UNKNOWN\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length

_V2_ADDRESS_BLOCK = {0x1: (4, 12), 0x2: (16, 36)}  # family -> (address size, block size)


class ProxyHeaderError(Refused):
    """A malformed PROXY header: the connection is refused before TLS (exit 1)."""


class ProxyHeaderUnsupported(ProxyHeaderError):
    """A well-formed header for something that is not a TCP connection."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said about the connection.

    ``source`` and ``destination`` are (ip, port), the client's and the
    address it connected to; both are None for a header that carries no
    client (v1 UNKNOWN, v2 LOCAL or unspecified family).
    """

    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


class HeaderReader:
    """Accumulates the bytes of one PROXY header, version 1 or 2.

    ``header`` is None until the header is complete.  ``feed`` raises
    ``ProxyHeaderError`` as soon as the bytes so far cannot start a valid
    header, and ``EOFError`` if fed b"" (the peer closed before the end).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None

    def max_read(self) -> int:
        """How many bytes may be read now without reading past the header (0 once done)."""
        buf = self._buf
        if self.header is not None:
            return 0
        if len(buf) < V1_MIN:
            return V1_MIN - len(buf)  # both kinds of header are at least this long
        if buf.startswith(V1_PREFIX):
            # The line ends with CRLF: unless the last byte is CR, two more at least.
            return 1 if buf.endswith(b"\r") else 2
        if len(buf) < V2_FIXED:
            return V2_FIXED - len(buf)
        (length,) = struct.unpack_from("!H", buf, 14)
        return V2_FIXED + length - len(buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data`` (at most ``max_read()`` bytes); return the header once complete."""
        if self.header is not None:
            raise ValueError("the header is already complete")
        if not data:
            raise EOFError("connection closed before the end of the PROXY header")
        if len(data) > self.max_read():
            raise ValueError("fed more than max_read() bytes")
        self._buf += data
        buf = bytes(self._buf)
        if not (V1_PREFIX.startswith(buf[:6]) or V2_SIGNATURE.startswith(buf[:12])):
            raise ProxyHeaderError("invalid PROXY header signature")
        if buf.startswith(V1_PREFIX):
            if buf.endswith(b"\r\n"):
                self.header = parse_v1(buf)
            elif len(buf) >= V1_MAX or b"\n" in buf:  # no CRLF within 107 bytes
                raise ProxyHeaderError("invalid PROXY line")
        elif len(buf) >= V2_FIXED:
            _check_v2_fixed(buf)
            if self.max_read() == 0:
                self.header = parse_v2(buf)
        return self.header


def parse_v1(line: bytes) -> ProxyHeader:
    """A complete v1 line, ``PROXY TCP4 src dst sport dport\\r\\n`` (or TCP6, UNKNOWN)."""
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n") or len(line) > V1_MAX:
        raise ProxyHeaderError("invalid PROXY line")
    fields = line[len(V1_PREFIX) : -2].split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(1)  # whatever follows is to be ignored, says the spec
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise ProxyHeaderError("invalid PROXY line")
    version = 4 if fields[0] == b"TCP4" else 6
    src = _v1_address(fields[1], version)
    dst = _v1_address(fields[2], version)
    return ProxyHeader(1, (src, _v1_port(fields[3])), (dst, _v1_port(fields[4])))


def parse_v2(block: bytes) -> ProxyHeader:
    """A complete v2 header: the 16 fixed bytes and exactly the length they announce."""
    _check_v2_fixed(block)
    command = block[12] & 0x0F
    family, protocol = block[13] >> 4, block[13] & 0x0F
    (length,) = struct.unpack_from("!H", block, 14)
    body = block[V2_FIXED:]
    if len(body) != length:
        raise ProxyHeaderError("PROXY v2 header length mismatch")
    if command == 0x0 or family == 0x0 or protocol == 0x0:
        return ProxyHeader(2)  # LOCAL, or nothing said about the client
    if family not in _V2_ADDRESS_BLOCK or protocol != 0x1:
        what = "UNIX socket" if family == 0x3 else "datagram"
        raise ProxyHeaderUnsupported(f"unsupported PROXY v2 connection: {what}")
    size, block_size = _V2_ADDRESS_BLOCK[family]
    if length < block_size:
        raise ProxyHeaderError("PROXY v2 address block too short")
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    _check_tlvs(body[block_size:])
    return ProxyHeader(2, (format_ip(src), sport), (format_ip(dst), dport))


def format_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as s6tls writes TCPREMOTEIP: IPv4-mapped IPv6 in its IPv4 form."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _check_v2_fixed(buf: bytes) -> None:
    if buf[12] >> 4 != 0x2:
        raise ProxyHeaderError("invalid PROXY v2 version")
    if buf[12] & 0x0F > 0x1:
        raise ProxyHeaderError("invalid PROXY v2 command")
    if buf[13] >> 4 > 0x3 or buf[13] & 0x0F > 0x2:
        raise ProxyHeaderError("invalid PROXY v2 family or protocol")


def _check_tlvs(tlvs: bytes) -> None:
    """Raise unless ``tlvs`` is a sequence of whole (type, length, value) records."""
    pos = 0
    while pos < len(tlvs):
        if len(tlvs) - pos < 3:
            raise ProxyHeaderError("invalid TLV in PROXY v2 header")
        (length,) = struct.unpack_from("!H", tlvs, pos + 1)
        pos += 3 + length
        if pos > len(tlvs):
            raise ProxyHeaderError("invalid TLV in PROXY v2 header")


def _v1_address(text: bytes, version: int) -> str:
    """An address of the family the line announced; IPv4 in dotted-quad form only."""
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("invalid address in PROXY line") from None
    # No zone ("fe80::1%eth0"), no IPv4 outside its canonical dotted quad.
    if ip.version != version or b"%" in text or (version == 4 and str(ip).encode() != text):
        raise ProxyHeaderError("invalid address in PROXY line")
    return format_ip(ip)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (text.startswith(b"0") and text != b"0"):
        raise ProxyHeaderError("invalid port in PROXY line")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("invalid port in PROXY line")
    return port

"""DTLS peers for the tests, and what the tests of s6-dtlsserver share.

``DtlsClient`` is a DTLS client on pyOpenSSL itself (not s6tls's code):
a connected UDP socket, the handshake with OpenSSL's own retransmission
timer, then one record per datagram each way.  ``step()`` advances its
handshake without blocking, so a test can drive a hundred at once.
``client_hello()`` is the first datagram a DTLS client sends (no cookie
yet), for a test that forges one.  ``bench.dtls`` uses ``DtlsClient`` too.
"""

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

from OpenSSL import SSL

MTU = 1232
APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
ECHO = [sys.executable, os.path.join(APPS, "dgram_echo.py")]  # echoes and logs datagrams


def client_context(cafile: str | None) -> SSL.Context:
    """A DTLS 1.2 client context that checks the server's chain (if ``cafile``) and name."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    return ctx


class DtlsClient:
    """One DTLS association to 127.0.0.1:``port``, from a socket of its own."""

    def __init__(self, port: int, cafile: str | None, servername: str = "localhost") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.conn = SSL.Connection(client_context(cafile), self.sock)
        self.conn.set_tlsext_host_name(servername.encode())
        self.conn.set_ciphertext_mtu(MTU)
        self.conn.set_connect_state()
        self.done = False

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def step(self) -> bool:
        """Advance the handshake without blocking (retransmitting when due); True once done."""
        if self.done:
            return True
        left = self.conn.DTLSv1_get_timeout()
        if left is not None and left <= 0:
            self.conn.DTLSv1_handle_timeout()
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return False
        self.done = True
        return True

    def handshake(self, timeout: float = 20) -> None:
        """The whole handshake, or ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while not self.step():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("DTLS handshake")
            timer = self.conn.DTLSv1_get_timeout()
            select.select([self.sock], [], [], min(left, timer if timer is not None else left))

    def send(self, data: bytes) -> None:
        self.conn.send(data)

    def recv(self, timeout: float = 20) -> bytes | None:
        """The next record's data; None at the server's close_notify; ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.conn.recv(1 << 16)
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no datagram")
            select.select([self.sock], [], [], left)

    def close_notify(self) -> None:
        self.conn.shutdown()

    def close(self) -> None:
        self.sock.close()


def memory_client() -> SSL.Connection:
    """A DTLS client on memory BIOs: the test carries its datagrams (``next_flight``)."""
    conn = SSL.Connection(client_context(None), None)
    conn.set_ciphertext_mtu(MTU)
    conn.set_connect_state()
    return conn


def next_flight(conn: SSL.Connection, answer: bytes = b"") -> bytes:
    """Give ``conn`` the server's ``answer`` (if any); what it sends next."""
    if answer:
        conn.bio_write(answer)
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(1 << 16)


def client_hello() -> bytes:
    """The first datagram of a DTLS client: a ClientHello with an empty cookie."""
    return next_flight(memory_client())


def lines_until(proc: subprocess.Popen, needle: str, limit: int = 10_000) -> list[str]:
    """The server's log lines up to the first that holds ``needle`` (which must come)."""
    assert proc.stderr is not None
    lines = []
    for _ in range(limit):
        line = proc.stderr.readline().decode()
        assert line, f"the log ended before {needle!r}: {lines}"
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} in {limit} lines")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM the server once its associations are over: its status and the rest of its log."""
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    return proc.returncode, err.decode()


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forge_port_unreachable(victim: tuple[str, int], peer: tuple[str, int]) -> None:
    """Tell ``victim``'s host, as any router could, that ``peer``'s UDP port is closed.

    An ICMP port unreachable (type 3, code 3) quoting a datagram from
    ``victim`` to ``peer`` (IPv4), from a raw socket, which needs root: a UDP
    socket at ``victim`` connected to ``peer`` gets ECONNREFUSED on its next call.
    """
    quoted = struct.pack(
        "!BBHHHBBH4s4sHHHH", 0x45, 0, 28, 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(victim[0]), socket.inet_aton(peer[0]), victim[1], peer[1], 8, 0,
    )  # fmt: skip
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.sendto(icmp, (victim[0], 0))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s_server_dtls(*args: str, says: bytes) -> Iterator[tuple[int, subprocess.Popen]]:
    """``openssl s_server -dtls -naccept 1 args`` on a free port, saying ``says`` to its client.

    Yields its port and the process (stdout a pipe: what it received);
    killed and reaped on the way out.
    """
    port = free_udp_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-dtls", "-accept", f"127.0.0.1:{port}", "-naccept", "1", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdin is not None
        server.stdin.write(says)
        server.stdin.flush()
        yield port, server
    finally:
        server.kill()
        server.wait()

"""The DTLS link: its retransmission schedule without I/O, then on real UDP sockets."""

import select
import socket
import threading

import pytest
from dtls_peer import DtlsClient

from s6tls.dtls.cookie import verify_hello
from s6tls.dtls.link import Retransmission, datagram_link
from s6tls.link import WouldBlock
from s6tls.tls.config import Options, TlsConfig
from s6tls.tls.context import Contexts, prepare_connection
from s6tls.tls.handshake import handshake


class OpenSslTimer:
    """OpenSSL's own timer as DTLSv1_get_timeout shows it: 1 s, doubling to 60 s per try."""

    def __init__(self) -> None:
        self.duration = 1.0
        self.expiry: float | None = None

    def start(self, now: float, new_flight: bool) -> None:
        self.duration = 1.0 if new_flight else min(self.duration * 2, 60.0)
        self.expiry = now + self.duration

    def left(self, now: float) -> float | None:
        return None if self.expiry is None else max(0.0, self.expiry - now)


def schedule(min_ms: int, max_ms: int, tries: int) -> list[float]:
    """The times of the first ``tries`` retransmissions of a flight sent at 0."""
    timer, openssl = Retransmission(min_ms, max_ms), OpenSslTimer()
    openssl.start(0.0, new_flight=True)
    timer.observe(0.0, openssl.left(0.0))
    times = []
    for _ in range(tries):
        at = timer.at()
        assert at is not None
        assert openssl.expiry is not None and at >= openssl.expiry  # never before OpenSSL's
        times.append(round(at, 3))
        timer.retransmitting()
        openssl.start(at, new_flight=False)
        timer.observe(at, openssl.left(at))
    return times


def test_the_default_schedule_is_openssl_s_own():
    assert schedule(1000, 60000, 8) == [1, 3, 7, 15, 31, 63, 123, 183]


def test_a_longer_first_wait_doubles_from_there_up_to_the_most():
    assert schedule(3000, 60000, 6) == [3, 9, 21, 45, 93, 153]
    assert schedule(1000, 120000, 9) == [1, 3, 7, 15, 31, 63, 127, 247, 367]


def test_a_new_flight_starts_the_schedule_again():
    timer, openssl = Retransmission(2000, 60000), OpenSslTimer()
    openssl.start(0.0, new_flight=True)
    timer.observe(0.0, openssl.left(0.0))
    timer.retransmitting()
    openssl.start(2.0, new_flight=False)
    timer.observe(2.0, openssl.left(2.0))
    assert timer.at() == 6.0
    openssl.start(3.5, new_flight=True)  # the peer answered: our next flight
    timer.observe(3.5, openssl.left(3.5))
    assert timer.at() == 5.5
    timer.observe(4.0, None)  # the handshake is over
    assert timer.at() is None


@pytest.fixture
def configs(pki):
    scfg = TlsConfig.from_env(
        "server",
        {"CERTFILE": pki["server_cert"], "KEYFILE": pki["server_key"]},
        Options(),
        dtls=True,
    )
    ccfg = TlsConfig.from_env(
        "client", {"CAFILE": pki["ca"]}, Options(servername="localhost"), dtls=True
    )
    return scfg, Contexts(scfg, tickets=True).context, ccfg, Contexts(ccfg).context


def test_a_server_link_starts_from_the_verified_client_hello(configs, pki):
    """The listener's cookie check, then the link on a socket of its own: one handshake."""
    scfg, sctx, _ccfg, _cctx = configs
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(20)
    client = DtlsClient(listener.getsockname()[1], pki["ca"])
    verified = False
    while not verified:
        client.step()
        data, addr = listener.recvfrom(1 << 16)
        reply, verified = verify_hello(sctx, data, addr)
        if reply:
            listener.sendto(reply, addr)
    own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.bind(listener.getsockname())
    own.connect(addr)
    link = datagram_link(scfg, sctx, own.detach(), data)
    prepare_connection(scfg, link.conn)
    thread = threading.Thread(target=client.handshake)
    thread.start()
    handshake(link, 20000)
    thread.join()
    assert client.done and link.max_datagram == 1195
    client.send(b"to the server")
    client.sock.send(b"")  # an empty datagram, taken off the socket before OpenSSL reads
    buf = memoryview(bytearray(1 << 16))
    for _ in range(3):  # the empty datagram is skipped, whatever came first
        select.select([link.rfd], [], [], 20)
        try:
            n = link.recv(buf)
            break
        except WouldBlock:
            continue
    assert bytes(buf[:n]) == b"to the server"
    link.close()
    client.close()
    listener.close()

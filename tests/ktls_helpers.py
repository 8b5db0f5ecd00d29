"""What the kernel TLS tests share: the suites, contexts that report their keys, pairs."""

import contextlib
import select
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence

from conftest import program
from OpenSSL import SSL
from server_helpers import start_server

from s6tls.ktls import keys as ktls_keys
from s6tls.ktls.sockopts import KernelTls

TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
# trustme's certificates have ECDSA keys.
TLS12_CIPHERS = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
]
CASES = [(ktls_keys.TLS_1_3_VERSION, s) for s in TLS13_SUITES] + [
    (ktls_keys.TLS_1_2_VERSION, c) for c in TLS12_CIPHERS
]
IDS = [c for _v, c in CASES]
DEADLINE_MS = 30_000


def watched_contexts(
    pki: dict[str, str], version: int, cipher: str | None, *, watch: bool = True
) -> tuple[SSL.Context, SSL.Context]:
    """A server and a client context limited to ``version`` and ``cipher``.

    ``version`` is ``ktls_keys.TLS_1_2_VERSION`` or ``TLS_1_3_VERSION``; with
    ``watch``, both contexts log their traffic secrets for ``connection_keys``.
    """
    proto = SSL.TLS1_3_VERSION if version == ktls_keys.TLS_1_3_VERSION else SSL.TLS1_2_VERSION
    server = SSL.Context(SSL.TLS_METHOD)
    server.use_certificate_chain_file(pki["server_cert"])
    server.use_privatekey_file(pki["server_key"])
    client = SSL.Context(SSL.TLS_METHOD)
    for ctx in (server, client):
        ctx.set_min_proto_version(proto)
        ctx.set_max_proto_version(proto)
        if cipher and version == ktls_keys.TLS_1_3_VERSION:
            ctx.set_tls13_ciphersuites(cipher.encode())
        elif cipher:
            ctx.set_cipher_list(cipher.encode())
        if watch:
            ktls_keys.watch_context(ctx)
    return server, client


def watched(conn: SSL.Connection) -> SSL.Connection:
    """``conn`` with a ``HandshakeWatch`` as its info callback, kept as its app data."""
    watch = ktls_keys.HandshakeWatch()
    conn.set_info_callback(watch.on_info)
    conn.set_app_data(watch)
    return conn


def keys_of(conn: SSL.Connection) -> ktls_keys.ConnectionKeys:
    """The kernel keys of a connection made ``watched``, its handshake done."""
    return ktls_keys.connection_keys(conn, conn.get_app_data())


def wait_for(fd: int, events: int) -> None:
    """Poll ``fd`` for ``events``; fail the test if it is not ready within the deadline."""
    poller = select.poll()
    poller.register(fd, events)
    assert poller.poll(DEADLINE_MS), f"fd {fd} not ready for {events} in time"


class Pair:
    """A TLS connection over loopback TCP, handshake done, both ends in this process.

    With ``server_bio``, the server's OpenSSL works on memory BIOs and the
    test writes its records to the socket itself (``raw_records``).
    """

    def __init__(self, pki, version, cipher, *, server_bio=False):
        server_ctx, client_ctx = watched_contexts(pki, version, cipher)
        with socket.create_server(("127.0.0.1", 0)) as lis:
            self.csock = socket.create_connection(lis.getsockname())
            self.ssock, _ = lis.accept()
        for s in (self.csock, self.ssock):
            s.setblocking(False)
        self.server = watched(SSL.Connection(server_ctx, None if server_bio else self.ssock))
        self.client = watched(SSL.Connection(client_ctx, self.csock))
        self.server.set_accept_state()
        self.client.set_connect_state()
        self.server_bio = server_bio
        done: set[int] = set()
        while len(done) < 2:
            moved = self._move_bio() if server_bio else False
            for i, conn in enumerate((self.server, self.client)):
                if i not in done:
                    with contextlib.suppress(SSL.WantReadError):
                        conn.do_handshake()
                        done.add(i)
            if server_bio:
                moved |= self._move_bio()
            if len(done) < 2 and not moved:
                fds = [self.ssock, self.csock]
                assert select.select(fds, [], [], DEADLINE_MS / 1000)[0], "handshake stalled"
        self.opened: list[KernelTls] = []

    def _move_bio(self) -> bool:
        """Move ciphertext between the server's BIOs and its socket; True if any moved."""
        moved = False
        with contextlib.suppress(SSL.WantReadError):
            while out := self.server.bio_read(65536):
                self.ssock.sendall(out)
                moved = True
        with contextlib.suppress(BlockingIOError):
            while data := self.ssock.recv(65536):
                self.server.bio_write(data)
                moved = True
        return moved

    def raw_records(self, data: bytes) -> bytes:
        """The records the (memory BIO) server makes of ``data``, not sent."""
        assert self.server_bio
        self.server.sendall(data)
        out = b""
        with contextlib.suppress(SSL.WantReadError):
            while chunk := self.server.bio_read(65536):
                out += chunk
        return out

    def kernel(self, side: str) -> KernelTls:
        conn, sock = (self.server, self.ssock) if side == "server" else (self.client, self.csock)
        ktls = KernelTls.install(sock.fileno(), keys_of(conn))
        self.opened.append(ktls)
        return ktls

    def close(self):
        for k in self.opened:
            k.close()
        self.ssock.close()
        self.csock.close()


@contextlib.contextmanager
def pairs(pki) -> Iterator[Callable[..., Pair]]:
    """A maker of ``Pair`` (same arguments but ``pki``); each is closed at the end."""
    made: list[Pair] = []

    def make(version, cipher, **kwargs) -> Pair:
        made.append(Pair(pki, version, cipher, **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


def stop(proc: subprocess.Popen, timeout: float = 60) -> str:
    """End s6-tlsserver (SIGTERM: its children finish first); return its stderr."""
    proc.terminate()
    _out, err = proc.communicate(timeout=timeout)
    return err.decode(errors="replace")


def one_connection(
    server: tuple[Sequence[str], Sequence[str]],
    client: tuple[Sequence[str], Sequence[str]],
    env: Mapping[str, str],
    server_env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> tuple[subprocess.CompletedProcess, str]:
    """s6-tlsserver -v ARGS PROG and one s6-tlsclient -v ARGS 127.0.0.1 PORT PROG.

    ``server`` and ``client`` are (args, prog).  Returns the client's result
    and the server's stderr, once the server is stopped.
    """
    proc, port = start_server(["-v", *server[0]], server[1], server_env or env)
    try:
        done = subprocess.run(
            [*program("s6-tlsclient"), "-v", *client[0], "127.0.0.1", str(port), *client[1]],
            env=dict(env),
            capture_output=True,
            timeout=timeout,
        )
    finally:
        err = stop(proc, timeout)
    return done, err

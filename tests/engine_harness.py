"""Run ``engine.run`` for real: each side in its own forked process, cleartext on pipes.

``start_engine`` forks a child that performs the handshake on the ciphertext
fds it is given, then runs the engine with two cleartext pipes whose other
ends stay with the test (or with a real application process it spawns).  The
child reports, as one JSON line on a result pipe: what ``run`` returned or
raised, which of its four data descriptors were still open afterwards, and
its memory (VmRSS before ``run``, VmHWM after).
"""

import contextlib
import hashlib
import json
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from OpenSSL import SSL

from s6tls.engine import run
from s6tls.errors import TlsRuntimeError
from s6tls.link import new_link
from s6tls.selfpipe import SelfPipe
from s6tls.serve.app import spawn
from s6tls.tls.handshake import handshake


def contexts(
    pki: dict[str, str], max_version: int | None = None
) -> tuple[SSL.Context, SSL.Context]:
    """A server and a client context; the client verifies the server against the test CA."""
    server = SSL.Context(SSL.TLS_METHOD)
    server.use_certificate_chain_file(pki["server_cert"])
    server.use_privatekey_file(pki["server_key"])
    client = SSL.Context(SSL.TLS_METHOD)
    client.load_verify_locations(pki["ca"])
    client.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    for ctx in (server, client):
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
    return server, client


def transport(kind: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Ciphertext fds (read, write) for two sides: one socketpair, or two pipes."""
    if kind == "socketpair":
        a, b = socket.socketpair()
        fa, fb = a.detach(), b.detach()
        return (fa, fa), (fb, fb)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return (r1, w2), (r2, w1)


def _memory(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _open_fds() -> set[int]:
    """This process's open descriptors, from /proc/self/fd.

    The listing's own descriptor is closed again by the time it returns: keep
    only what is still open.
    """
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with contextlib.suppress(OSError):  # the listing's own fd is gone already
                os.close(int(name))


@dataclass
class Engine:
    """A running engine child, and the test's ends of its cleartext pipes."""

    pid: int
    to_engine: int  # the test writes here what "the application" sends
    from_engine: int  # the test reads here what "the application" receives
    result_fd: int
    result: dict = field(default_factory=dict)

    def wait(self, timeout: float = 60) -> dict:
        """The child's JSON report; the child is reaped."""
        done = threading.Event()
        chunks: list[bytes] = []

        def read() -> None:
            while chunk := os.read(self.result_fd, 65536):
                chunks.append(chunk)
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not done.wait(timeout):
            os.kill(self.pid, 9)
            reader.join(10)
        os.close(self.result_fd)
        os.waitpid(self.pid, 0)
        self.result = json.loads(b"".join(chunks) or b'{"error": "no report"}')
        return self.result


def start_engine(
    role: str,
    ctx: SSL.Context,
    net: tuple[int, int],
    *,
    app: Sequence[str] | None = None,
    **options: object,
) -> Engine:
    """Fork an engine child for ``role`` ("server" or "client") on ciphertext ``net``.

    The child closes every descriptor it inherited but its own (the other
    engine's pipes, the peer's ciphertext ends), or EOFs would never be seen.
    ``app``: if given, the child spawns this program with the cleartext pipes
    on its stdin/stdout and passes its pid to ``run``; the test's ends of the
    cleartext pipes then see nothing.
    """
    to_engine_r, to_engine_w = os.pipe()  # "application" -> engine
    from_engine_r, from_engine_w = os.pipe()  # engine -> "application"
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        report: dict = {}
        try:
            keep = {0, 1, 2, result_w, to_engine_r, from_engine_w, *net}
            if app is not None:
                keep |= {from_engine_r, to_engine_w}
            _close_all_but(keep)
            link = new_link(ctx, *net)
            conn = link.conn
            conn.set_accept_state() if role == "server" else conn.set_connect_state()
            handshake(link, 10000)
            with SelfPipe() as selfpipe:
                app_pid = None
                if app is not None:  # its stdin is what the engine receives
                    app_pid = spawn(app, dict(os.environ), {from_engine_r: 0, to_engine_w: 1})
                    os.close(from_engine_r)
                    os.close(to_engine_w)
                report["rss_before"] = _memory("VmRSS")
                data_fds = (to_engine_r, from_engine_w, *net)
                fds_before = _open_fds()
                app_fds = (to_engine_r, from_engine_w, selfpipe.fileno())
                try:
                    report["ret"] = run(link, app_fds, app_pid, **options)
                except TlsRuntimeError as exc:
                    report["error"] = "TlsRuntimeError"
                    report["message"] = str(exc)
                report["hwm_after"] = _memory("VmHWM")
                # run must close its four data fds and open nothing it keeps
                report["left_open"] = sorted(_open_fds() - (fds_before - set(data_fds)))
                if app_pid is not None:
                    try:  # run returned first: wait for it as the programs do
                        report["app_status"] = os.waitpid(app_pid, 0)[1]
                        report["app_reaped"] = False
                    except ChildProcessError:
                        report["app_reaped"] = True
        except BaseException as exc:
            report["error"] = type(exc).__name__
            report["message"] = str(exc)
        os.write(result_w, json.dumps(report).encode())
        os._exit(0)
    for fd in {to_engine_r, from_engine_w, result_w, *net}:
        os.close(fd)
    if app is not None:  # the application, not the test, holds the cleartext ends
        os.close(to_engine_w)
        os.close(from_engine_r)
        to_engine_w = from_engine_r = -1
    return Engine(pid, to_engine_w, from_engine_r, result_r)


class Stream:
    """The test playing one application: send ``payload`` and read everything back.

    ``close_after`` (an Event) delays closing our output until it is set, so a
    test decides which side ends first.  ``received`` is set when our input
    reached EOF.
    """

    def __init__(
        self,
        engine: Engine,
        payload: bytes,
        close_after: threading.Event | None = None,
        *,
        read_after: threading.Event | None = None,
        pause: float = 0.0,
        chunk: int = 65536,
    ):
        self.engine = engine
        self.payload = payload
        self.received = threading.Event()
        self.close_after = close_after
        self.read_after = read_after  # the reader stalls until this is set
        self.pause = pause  # a deliberately slow writer: this long between chunks
        self.chunk = chunk
        self.digest = hashlib.sha256()
        self.count = 0
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        view = memoryview(self.payload)
        try:
            while view:
                view = view[os.write(self.engine.to_engine, view[: self.chunk]) :]
                if self.pause and view:
                    threading.Event().wait(self.pause)
            if self.close_after is not None:
                self.close_after.wait(60)
        except BrokenPipeError:
            pass
        finally:
            os.close(self.engine.to_engine)

    def _receive(self) -> None:
        if self.read_after is not None:
            self.read_after.wait(60)
        while chunk := os.read(self.engine.from_engine, 65536):
            self.digest.update(chunk)
            self.count += len(chunk)
        os.close(self.engine.from_engine)
        self.received.set()

    def join(self, timeout: float = 60) -> None:
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "the stream did not finish"

"""Property tests of the close rules: random sizes, chunking and endings, every -s/-S, -j/-J.

Each example runs the real s6-tlsd code (``s6tls.tlsd.main``, forked from the
test process so no interpreter starts) on one end of a loopback TCP
connection, with a small shell application that reads what the peer sends
into a file and writes a payload back.  The other end is a pyOpenSSL peer in
the test, on memory BIOs, so that the test chooses both the TLS record sizes
(``records``) and how the ciphertext is cut into TCP writes (``wire``).

What varies (``Scenario``): TLS 1.2 or 1.3, the byte counts each way, the
chunking, who closes first (``first``), how the peer ends (close_notify, a
bare FIN, a reset) and how the application ends (exit 0, or SIGKILL).  Every
example checks what section 5 and 6 of the contract require:

* the application receives a prefix of what the peer sent, and the peer a
  prefix of what the application wrote: never a byte that was not sent;
* when the ending is clean, both prefixes are everything, the exit code is
  the application's (0, or 137 when it was killed), stderr is empty, and the
  peer saw close_notify exactly under -S;
* otherwise the exit code is 98 with exactly one ``s6-tlsd: fatal:`` line
  naming the cause (a truncation under -J, a broken connection after a
  reset), never a traceback; the one documented loss is TLS 1.2 under -S,
  where the peer's close_notify ends both directions at once;
* nothing hangs: every example ends within 30 s.

Default mode runs 15 examples per -s/-S, -j/-J combination (60 in all);
S6TLS_SLOW=1 runs 253 per combination (1012 in all).  An example whose peer
resets the connection while the application, its output closed, still reads
costs 2 s: the engine gives the application that long to exit by itself
before it reports the error.
"""

import contextlib
import errno
import os
import random
import select
import socket
import struct
import time
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import pytest
from forked import forked_main
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from ucspi_helpers import unprefixed

import s6tls.serve.tunnel

# Imported once here, so that each forked child does not import them again.
import s6tls.tlsd

SLOW = os.environ.get("S6TLS_SLOW") == "1"
EXAMPLES = 250 if SLOW else 12  # per -s/-S, -j/-J combination, plus the explicit examples
TIMEOUT = 30.0

# The application, by who closes first.  $SEND holds what it writes, $RECV
# gets what it reads; $END is "exit 0" or "kill -9 $$".
APPS = {
    # the peer sends everything and closes; the application answers after EOF
    "peer": 'cat >"$RECV"; cat "$SEND"; $END',
    # the application sends everything and closes its output, then reads
    "app": 'cat "$SEND"; exec >&-; cat >"$RECV"; $END',
    # both at once (a background job's stdin is /dev/null in sh: pass it on fd 3)
    "both": 'exec 3<&0; cat <&3 >"$RECV" 3<&- & exec 3<&-; cat "$SEND"; exec >&-; wait; $END',
    # the application writes and dies without reading: its input is dropped
    "app_dies": 'cat "$SEND"; $END',
}


@dataclass(frozen=True)
class Scenario:
    tls12: bool
    up: int  # bytes the peer sends to the application
    down: int  # bytes the application sends to the peer
    records: tuple[int, ...]  # the peer's cleartext write sizes, cycled: its record sizes
    wire: tuple[int, ...]  # the peer's ciphertext write sizes, cycled
    first: str  # a key of APPS
    peer_end: str  # "close_notify", "fin" or "rst"
    app_end: str  # "exit" or "killed"


@dataclass
class Outcome:
    code: int
    stderr: str
    peer_got: bytes
    peer_ending: str  # "close_notify", "eof", "reset", or "error: ..."
    app_got: bytes | None  # None when the application never created $RECV

    def __repr__(self) -> str:
        app = "absent" if self.app_got is None else len(self.app_got)
        return (
            f"Outcome(code={self.code}, stderr={self.stderr!r}, peer_got={len(self.peer_got)},"
            f" peer_ending={self.peer_ending!r}, app_got={app})"
        )


def sizes() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 64), st.integers(0, 40_000), st.integers(0, 400_000))


scenarios = st.builds(
    Scenario,
    tls12=st.booleans(),
    up=sizes(),
    down=sizes(),
    records=st.lists(st.integers(1, 20_000), min_size=1, max_size=6).map(tuple),
    wire=st.lists(
        st.one_of(st.integers(1, 16), st.integers(1, 70_000)), min_size=1, max_size=6
    ).map(tuple),
    first=st.sampled_from(sorted(APPS)),
    peer_end=st.sampled_from(["close_notify", "fin", "rst"]),
    app_end=st.sampled_from(["exit", "killed"]),
)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


@pytest.fixture(scope="module")
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def peer_contexts(pki):
    """Client contexts for the peer, TLS 1.3 and TLS 1.2, built before any connection."""
    out = {}
    for tls12 in (False, True):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.load_verify_locations(pki["ca"])
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        # A bare EOF is not an error for the peer either (it would send an
        # alert); close_notify is told apart by the info callback.
        ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
        if tls12:
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        out[tls12] = ctx
    return out


def fork_tlsd(argv: list[str], sock: socket.socket, env: dict[str, str], keep_closed) -> tuple:
    """Run ``s6tls.tlsd.main(argv)`` in a forked child, ``sock`` on its fds 0 and 1.

    Returns (pid, pidfd, read end of its stderr).  ``keep_closed``: our
    sockets the child must not hold (the peer's end, the listener).
    """
    err_r, err_w = os.pipe()
    pid = forked_main(
        s6tls.tlsd.main,
        argv,
        env,
        [(sock.fileno(), 0), (sock.fileno(), 1), (err_w, 2)],
        close=[s.fileno() for s in keep_closed] + [err_r],
    )
    os.close(err_w)
    return pid, os.pidfd_open(pid), err_r


class Peer:
    """The test's TLS client on memory BIOs, over a non-blocking socket."""

    def __init__(self, ctx: SSL.Context, sock: socket.socket, sc: Scenario, up: bytes) -> None:
        self.sc = sc
        self.sock = sock
        sock.setblocking(False)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(b"localhost")
        self.conn.set_info_callback(self._on_info)
        self.close_notify_seen = False
        self.up = memoryview(up)
        self.sent = 0
        self.records = cycle(sc.records)
        self.wire = cycle(sc.wire)
        self.out = bytearray()
        self.got = bytearray()
        self.ending: str | None = None  # set when reading is over
        self.handshaken = False
        self.sending = sc.first != "app"  # "app" first: send only after the application's end
        self.ended_write = False
        self.fin_pending = False
        self.send_failed = False
        self.sock_closed = False

    def _on_info(self, _conn: SSL.Connection, where: int, ret: int) -> None:
        # SSL_CB_READ_ALERT is two bits (alert | read): both must be set.
        if where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT and ret & 0xFF == 0:
            self.close_notify_seen = True

    def run(self, deadline: float) -> None:
        while not self._finished():
            if time.monotonic() > deadline:
                raise AssertionError("the peer did not finish: a hang")
            self._step()
            if self._finished():
                break
            rlist = [self.sock] if self.ending is None else []
            wlist = [self.sock] if self.out and not self.send_failed else []
            if rlist or wlist:
                r, w, _x = select.select(rlist, wlist, [], 1.0)
                if r:
                    self._read()
                if w:
                    self._write()

    def _finished(self) -> bool:
        if self.sock_closed:
            return True
        writing_done = self.send_failed or (
            self.ended_write and not self.out and not self.fin_pending
        )
        return self.ending is not None and (writing_done or not self.sending)

    def _step(self) -> None:
        if not self.handshaken:
            try:
                self.conn.do_handshake()
                self.handshaken = True
            except SSL.WantReadError:
                pass
        if self.handshaken and self.sending and not self.send_failed:
            while self.sent < len(self.up) and len(self.out) < 262_144:
                n = next(self.records)
                try:
                    self.sent += self.conn.send(self.up[self.sent : self.sent + n])
                except SSL.Error:
                    self.send_failed = True
                    break
            if self.sent == len(self.up) and not self.ended_write:
                self.ended_write = True
                if self.sc.peer_end == "close_notify":
                    with contextlib.suppress(SSL.Error):
                        self.conn.shutdown()
                self.fin_pending = True
        self._collect()
        if not self.out and self.fin_pending and not self.send_failed:
            self.fin_pending = False
            if self.sc.peer_end == "rst":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.sock.close()
                self.sock_closed = True
                self.ending = self.ending or "reset (ours)"
            else:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
        if self.out and not self.send_failed:
            self._write()

    def _collect(self) -> None:
        while True:
            try:
                self.out += self.conn.bio_read(65536)
            except SSL.WantReadError:
                return

    def _write(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out[: next(self.wire)])
            except BlockingIOError:
                return
            except OSError:
                self.send_failed = True
                self.out.clear()
                return
            del self.out[:n]

    def _read(self) -> None:
        try:
            data = self.sock.recv(262_144)
        except BlockingIOError:
            return
        except OSError as exc:
            self.ending = "reset" if exc.errno == errno.ECONNRESET else f"error: {exc}"
            return
        if data:
            self.conn.bio_write(data)
        else:
            self.conn.bio_shutdown()
        while self.ending is None:
            try:
                if not self.handshaken:
                    self.conn.do_handshake()
                    self.handshaken = True
                chunk = self.conn.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.ending = "close_notify" if self.close_notify_seen else "eof"
            except SSL.SysCallError:
                self.ending = "eof"
            except SSL.Error as exc:
                self.ending = "eof" if "unexpected eof" in str(exc) else f"error: {exc}"
            else:
                self.got += chunk
        if self.sc.first == "app" and self.ending in ("close_notify", "eof"):
            self.sending = True  # the application has ended its output: our turn
        self._collect()


def run_scenario(sc: Scenario, opts: list[str], env: dict, ctx, listener, workdir: Path):
    up, down = payload(sc.up, 1), payload(sc.down, 2)
    send, recv = workdir / "send", workdir / "recv"
    send.write_bytes(down)
    with contextlib.suppress(FileNotFoundError):
        recv.unlink()
    app_env = {
        **env,
        "SEND": str(send),
        "RECV": str(recv),
        "END": "exit 0" if sc.app_end == "exit" else "kill -9 $$",
    }
    ours = socket.create_connection(listener.getsockname())
    theirs, _addr = listener.accept()
    argv = [*opts, "--", "sh", "-c", APPS[sc.first].replace("$END", app_env["END"])]
    pid, pidfd, err_r = fork_tlsd(argv, theirs, app_env, (ours, listener))
    theirs.close()
    deadline = time.monotonic() + TIMEOUT
    peer = Peer(ctx, ours, sc, up)
    try:
        peer.run(deadline)
        if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError("s6-tlsd did not exit: a hang")
        _pid, status = os.waitpid(pid, 0)
    finally:
        if not peer.sock_closed:
            ours.close()
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        os.close(pidfd)
    os.set_blocking(err_r, False)
    err = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(err_r, 65536):
            err += chunk
    os.close(err_r)
    app_got = recv.read_bytes() if recv.exists() else None
    return (
        Outcome(
            os.waitstatus_to_exitcode(status),
            err.decode(errors="replace"),
            bytes(peer.got),
            peer.ending or "",
            app_got,
        ),
        up,
        down,
    )


def check(sc: Scenario, close_notify: bool, strict: bool, out: Outcome, up: bytes, down: bytes):
    """Assert what the contract requires of this outcome; return a short class name."""
    assert "Traceback" not in out.stderr, out.stderr
    assert down.startswith(out.peer_got), "the peer got bytes the application never wrote"
    if out.app_got is not None:
        assert up.startswith(out.app_got), "the application got bytes the peer never sent"
    app_code = 0 if sc.app_end == "exit" else 137
    # A reset may reach s6-tlsd as a bare EOF: OpenSSL (TLS 1.3) ignores a
    # reset while the server writes its post-handshake session tickets, and
    # that write takes the socket's pending ECONNRESET; the kernel then only
    # reports EOF.  So a reset ends like a FIN or as "connection broken".
    eof_like = sc.peer_end == "fin" or (sc.peer_end == "rst" and not sc.tls12)
    # Once the application is dead the engine only drains the peer: an EOF,
    # a truncation or a reset then is no error (the lingering close).
    app_dead_first = sc.first == "app_dies"
    if out.code == app_code:
        assert out.stderr == "", out.stderr
        if sc.peer_end == "rst":
            assert eof_like or app_dead_first, out
            return "clean: the reset came as an EOF, or after the application died"
        if sc.first != "app_dies":
            assert out.app_got == up, "a clean end lost bytes on their way to the application"
        if strict and sc.peer_end == "fin":
            # -J accepts a bare FIN only once the application is dead.
            assert app_dead_first, out
        tls12_cost = sc.tls12 and close_notify and sc.peer_end == "close_notify"
        if tls12_cost and sc.first != "app":
            # RFC 5246 7.2.1: under TLS 1.2 the peer's close_notify ends both
            # directions, and -S answers it at once (the documented cost):
            # what the application had not sent by then is dropped.
            assert out.peer_ending == "close_notify", out
            return "clean, TLS 1.2 -S answered the peer's close_notify at once"
        assert out.peer_got == down, "a clean end lost bytes on their way to the peer"
        # Our end is a close_notify under -S, and under TLS 1.3 with -s too (RFC 8446 6.1).
        expected = "close_notify" if close_notify or not sc.tls12 else "eof"
        assert out.peer_ending == expected, out
        return "clean"
    lines = unprefixed(out.stderr).splitlines()
    if out.code == 97:
        # A reset that overtakes the peer's last handshake flight (its handshake
        # is over once it wrote its Finished; the server's is not): the handshake
        # failed and no application ran.  Rare alone, common in a busy worker.
        assert sc.peer_end == "rst" and out.app_got is None and out.peer_got == b"", out
        assert lines == ["s6-tlsd: fatal: peer vanished during the handshake: "
                         "Connection reset by peer"], out.stderr  # fmt: skip
        return "97: reset before the server's handshake was over"
    assert out.code == 98, out
    assert len(lines) == 1 and lines[0].startswith("s6-tlsd: fatal: "), out.stderr
    assert not lines[0].rstrip().endswith(":"), "a message that does not say what went wrong"
    if lines[0] == "s6-tlsd: fatal: peer closed the connection without close_notify":
        assert strict and eof_like, out
        return "98: truncation under -J"
    assert sc.peer_end == "rst", out
    assert lines[0].startswith("s6-tlsd: fatal: connection broken: "), lines
    return "98: connection broken by a reset"


@pytest.mark.parametrize("strict", [False, True], ids=["j", "J"])
@pytest.mark.parametrize("close_notify", [False, True], ids=["s", "S"])
def test_random_endings_deliver_everything_or_fail_as_documented(
    close_notify, strict, pki, listener, peer_contexts, tmp_path
):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
    }
    opts = ["-S" if close_notify else "-s", "-J" if strict else "-j"]
    classes: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(sc=scenarios)
    # Found by this test: under -S our own close_notify was counted as the
    # peer's, so -J let a truncation after it pass (fixed in the engine).
    @example(sc=Scenario(False, 7, 0, (1,), (1,), "app", "fin", "exit"))
    @example(sc=Scenario(True, 70_000, 70_000, (3,), (5,), "app", "fin", "exit"))
    # A dead application's output still reaches a peer that keeps sending.
    @example(
        sc=Scenario(False, 400_000, 400_000, (16_384,), (65_536,), "app_dies", "fin", "killed")
    )
    def prop(sc: Scenario) -> None:
        out, up, down = run_scenario(sc, opts, env, peer_contexts[sc.tls12], listener, tmp_path)
        kind = check(sc, close_notify, strict, out, up, down)
        classes[kind] = classes.get(kind, 0) + 1

    prop()
    print(f"{' '.join(opts)}: {sum(classes.values())} scenarios, {classes}")

"""A misbehaving network between real peers: s6-tlsclient, s6-tlsserver, openssl.

Every connection goes through ``faultproxy.FaultProxy``.  The applications
are one small Python program (``DUPLEX``) that sends a seeded payload and
reports on stderr what it received (count and SHA-256), so the test compares
digests, never just counts.  What is checked, against the contract:

* split into 1-byte writes, delayed: identical bytes both ways, exit 0;
* cut (FIN or reset) at any point of the handshake: exit 97 with one line,
  and the application never started, on either side;
* cut with FIN after the handshake (no close_notify): a clean EOF under -j
  (the default), exit 98 under -J; a reset: exit 98, one line, no traceback;
* half-close from the network: the other direction still flows to its end;
* a stalled direction: the other one still flows to its end meanwhile.

One s6-tlsserver serves the whole module; its application reads what to do
from a file the test writes before connecting.
"""

import hashlib
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import STARTED, program
from faultproxy import Fault, FaultProxy, set_rst_on_close
from OpenSSL import SSL
from server_helpers import ALLOW_LINE, free_port, start_server
from ucspi_helpers import unprefixed

from s6tls.tls.reasons import error_reason

MiB = 1 << 20

# The application of both sides.  argv: read fd, write fd, bytes to send,
# seed, tag, then options: hold (keep our output open until our input
# ended), after_input (send only once our input ended), send_after=N (send
# once N bytes came in), expect=N (our input ends after N bytes),
# progress=N (report once N bytes came in), marker=PATH (create it first).
DUPLEX = r"""
import hashlib, os, random, sys, threading
rfd, wfd, size, seed = (int(a) for a in sys.argv[1:5])
tag = sys.argv[5]
opts = dict(a.partition("=")[::2] for a in sys.argv[6:])
def say(*words):
    os.write(2, (" ".join(["APP", tag, *map(str, words)]) + "\n").encode())
if "marker" in opts:
    open(opts["marker"], "w").close()
say("started")
data = random.Random(seed).randbytes(size)
input_done = threading.Event()
got_enough = threading.Event()
def send():
    if "after_input" in opts:
        input_done.wait()
    if "send_after" in opts:
        got_enough.wait()
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(wfd, view[:65536]):]
        say("sent", size)
    except OSError as exc:
        say("send-failed", exc.errno)
    if "hold" in opts:
        input_done.wait()
    os.close(wfd)
t = threading.Thread(target=send)
t.start()
h, n, said = hashlib.sha256(), 0, False
expect = int(opts.get("expect", -1))
progress = int(opts.get("progress", 0))
send_after = int(opts.get("send_after", 0))
while n != expect:
    try:
        chunk = os.read(rfd, 65536 if expect < 0 else min(65536, expect - n))
    except OSError as exc:
        say("read-failed", exc.errno)
        break
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
    if progress and not said and n >= progress:
        said = True
        say("progress", n)
    if n >= send_after:
        got_enough.set()
say("received", n, h.hexdigest())
got_enough.set()
input_done.set()
t.join()
"""
APP = [sys.executable, "-I", "-S", "-c", DUPLEX]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Log:
    """Lines of a process's stderr, read by a thread; tests wait on them."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            with self.cond:
                self.lines.append(raw.decode(errors="replace"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("")  # EOF
            self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def wait_for(self, pattern: str, since: int = 0, timeout: float = 30) -> re.Match:
        """The first line from ``since`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        with self.cond:
            index = since
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if match := regex.search(line):
                        return match
                    if line == "":
                        raise AssertionError(f"stream ended before {pattern!r}: {self.lines}")
                if not self.cond.wait(timeout):
                    raise AssertionError(f"no line {pattern!r} after {timeout}s: {self.lines}")

    def since(self, start: int) -> list[str]:
        with self.cond:
            return self.lines[start:]


class Server:
    """The module's s6-tlsserver; ``configure`` sets what its next application does."""

    def __init__(self, proc: subprocess.Popen, port: int, params: Path) -> None:
        self.proc = proc
        self.port = port
        self.params = params
        self.log = Log(proc.stderr)

    def configure(self, *args: object) -> int:
        """Arguments after ``0 1`` for the next connection's DUPLEX; returns a log mark."""
        self.params.write_text(" ".join(map(str, args)))
        return self.log.mark()

    def connection_end(self, since: int) -> tuple[int, list[str]]:
        """Wait for the end of the connection accepted after ``since``: status, its lines."""
        port = self.log.wait_for(ALLOW_LINE.pattern, since).group(2)
        status = int(
            self.log.wait_for(rf"end \S+ port {port} pid \S+ status (\d+)", since).group(1)
        )
        return status, self.log.since(since)


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    params = tmp_path_factory.mktemp("faults") / "params"
    params.write_text("0 0 idle")
    env = {
        **os.environ,
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
        "PARAMS": str(params),
        "PY": sys.executable,
        "DUPLEX": DUPLEX,
    }
    app = ["sh", "-c", 'exec "$PY" -I -S -c "$DUPLEX" 0 1 $(cat "$PARAMS")']
    proc, port = start_server(["-v"], app, env)
    srv = Server(proc, port, params)
    yield srv
    proc.terminate()
    proc.wait(timeout=30)


def client(port: int, pki, *args: str, tls_opts=()) -> subprocess.Popen:
    """s6-tlsclient to 127.0.0.1:port running DUPLEX on fds 6/7 with ``args``."""
    proc = subprocess.Popen(
        [
            *program("s6-tlsclient"),
            *tls_opts,
            "-k",
            "localhost",
            "127.0.0.1",
            str(port),
            *APP,
            "6",
            "7",
            *args,
        ],
        env={**os.environ, "CAFILE": pki["ca"]},
        stderr=subprocess.PIPE,
    )
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def app_report(text: str, tag: str) -> tuple[int, str]:
    """(count, sha256) from an application's ``received`` line in ``text``."""
    match = re.search(rf"^APP {tag} received (\d+) (\w+)$", text, re.M)
    assert match, text
    return int(match.group(1)), match.group(2)


def fatal_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": fatal: " in line]


def assert_one_fatal_line(text: str, prog: str) -> str:
    assert "Traceback" not in text, text
    lines = fatal_lines(unprefixed(text))
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: fatal: "), text
    return lines[0]


def assert_one_connection_warning(text: str, kind: str = "warning") -> str:
    """s6-tlsserver goes on when a connection fails: one warning naming peer and pid.

    ``kind`` "info": the peer never sent a byte (a scan, a silent socket),
    and its line is an info line, with no warning at all; "info|warning":
    either.
    """
    assert "Traceback" not in text and not fatal_lines(text), text
    pattern = rf"s6-tlsserver: (?:{kind}): peer \S+ pid \d+: \S"
    lines = [line for line in text.splitlines() if re.match(pattern, line)]
    assert len(lines) == 1, text
    assert not any(": warning: " in line for line in text.splitlines() if line not in lines)
    return lines[0]


# -- byte splitting and delays ----------------------------------------------

FAULTS = {
    "split": (Fault(split=True), 24_000),
    "delay": (Fault(delay=0.005), 300_000),
    "split+delay": (Fault(split=True, delay=0.0002), 12_000),
}


@pytest.mark.parametrize("name", FAULTS)
def test_split_and_delayed_writes_deliver_identical_bytes_both_ways(name, server, pki):
    fault, size = FAULTS[name]
    mark = server.configure(size, 11, "srv")
    with FaultProxy(server.port, c2s=fault, s2c=fault) as proxy:
        code, err = finish(client(proxy.port, pki, str(size), "12", "cli"))
        status, lines = server.connection_end(mark)
    assert code == 0, err
    assert app_report(err, "cli") == (size, digest(payload(size, 11)))
    assert status == 0, lines
    assert app_report("".join(lines), "srv") == (size, digest(payload(size, 12)))
    if fault.split:
        assert proxy.writes == proxy.forwarded  # really one byte per write


def test_openssl_s_client_through_split_writes_gets_identical_bytes(server, pki):
    size = 20_000
    sent = payload(size, 21)
    mark = server.configure(size, 22, "srv", f"expect={size}", "after_input")
    with FaultProxy(server.port, c2s=Fault(split=True), s2c=Fault(split=True)) as proxy:
        # -quiet ignores stdin EOF: the server's application ends the session.
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"127.0.0.1:{proxy.port}",
                "-servername",
                "localhost",
                "-CAfile",
                pki["ca"],
                "-verify_return_error",
            ],
            input=sent,
            capture_output=True,
            timeout=60,
        )
        status, lines = server.connection_end(mark)
    assert status == 0, lines
    assert app_report("".join(lines), "srv") == (size, digest(sent))
    assert result.stdout == payload(size, 22)
    # s6-tlsserver's default -s ends with a bare FIN: OpenSSL 3 calls it an
    # "unexpected eof" (exit 1) after the data; that is s_client's view of -s.
    assert result.returncode in (0, 1), result.stderr


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    """Wait until something listens on 127.0.0.1:``port`` (/proc/net/tcp, state 0A)."""
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    done = threading.Event()
    while not done.is_set():
        if proc.poll() is not None:
            raise AssertionError(f"openssl s_server exited: {proc.stderr.read()}")
        if needle in Path("/proc/net/tcp").read_text():
            return
        done.wait(0.01)  # polling a condition, not a guess at a duration


def s_server(pki, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-quiet",
            "-naccept",
            "1",
            "-accept",
            f"127.0.0.1:{port}",
            "-cert",
            pki["server_cert"],
            "-key",
            pki["server_key"],
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_listening(port, proc)
    return proc, port


def s_server_write(srv: subprocess.Popen, data: bytes) -> None:
    """Give s_server what to send, once the handshake is over.

    Written while s_server still performs the handshake, its input may stall
    after the first record (seen with OpenSSL 3.0.19's s_server): the test's
    clients therefore report ``started`` first.
    """
    srv.stdin.write(data)
    srv.stdin.flush()


def test_s6_tlsclient_through_split_writes_to_openssl_s_server_gets_identical_bytes(pki, reap):
    size_up, size_down = 20_000, 15_000
    srv, port = s_server(pki)
    reap.append(srv)
    with FaultProxy(port, c2s=Fault(split=True), s2c=Fault(split=True)) as proxy:
        # -S: OpenSSL 3 takes a bare FIN for an error and answers with an alert.
        cli = client(
            proxy.port, pki, str(size_up), "31", "cli", f"expect={size_down}", tls_opts=["-S"]
        )
        cli_log = Log(cli.stderr)
        cli_log.wait_for("^APP cli started$")
        s_server_write(srv, payload(size_down, 32))
        got = srv.stdout.read(size_up)
        code = cli.wait(timeout=60)
        cli_log.thread.join(30)
        err = "".join(cli_log.lines)
    srv.stdin.close()
    srv.wait(timeout=30)
    assert got == payload(size_up, 31)
    assert code == 0, err
    assert app_report(err, "cli") == (size_down, digest(payload(size_down, 32)))


# -- cuts during the handshake ----------------------------------------------


@pytest.fixture(scope="module")
def handshake_sizes(server, pki) -> dict[str, int]:
    """Bytes of the ClientHello and of the server's first flight, measured once."""
    mark = server.configure(0, 0, "srv")
    with FaultProxy(server.port) as proxy:
        code, err = finish(client(proxy.port, pki, "0", "0", "cli"))
        server.connection_end(mark)
    assert code == 0, err
    first_s2c = next(i for i, (d, _n) in enumerate(proxy.log) if d == "s2c")
    hello = sum(n for d, n in proxy.log[:first_s2c])
    next_c2s = next(i for i, (d, _n) in enumerate(proxy.log) if i > first_s2c and d == "c2s")
    flight = sum(n for _d, n in proxy.log[first_s2c:next_c2s])
    assert hello > 100 and flight > 100, proxy.log
    return {"c2s": hello, "s2c": flight}


CUTS = [
    ("c2s", "start", "fin"),
    ("c2s", "1", "fin"),
    ("c2s", "half", "fin"),
    ("c2s", "half", "rst"),
    ("c2s", "last", "fin"),
    ("s2c", "start", "fin"),
    ("s2c", "1", "fin"),
    ("s2c", "half", "fin"),
    ("s2c", "half", "rst"),
    ("s2c", "last", "fin"),
]


def cut_point(where: str, size: int) -> int:
    # "last": inside the flight's last record (an ECDSA signature, hence the
    # flight, varies by a few bytes from one handshake to the next).
    return {"start": 0, "1": 1, "half": size // 2, "last": size - 12}[where]


@pytest.mark.parametrize(("direction", "where", "mode"), CUTS)
def test_a_cut_during_the_handshake_exits_97_and_never_starts_either_application(
    direction, where, mode, server, pki, handshake_sizes, tmp_path
):
    """Cut inside the ClientHello (c2s) or the server's first flight (s2c)."""
    at = cut_point(where, handshake_sizes[direction])
    server_marker, client_marker = tmp_path / "server-app", tmp_path / "client-app"
    mark = server.configure(1000, 1, "srv", f"marker={server_marker}")
    fault = Fault(cut_after=at, cut=mode)
    with FaultProxy(server.port, **{direction: fault}) as proxy:
        code, err = finish(client(proxy.port, pki, "1000", "2", "cli", f"marker={client_marker}"))
        status, lines = server.connection_end(mark)
    assert proxy.cut_done.is_set()
    assert code == 97, err
    line = assert_one_fatal_line(err, "s6-tlsclient")
    assert "handshake" in line or "peer" in line, line
    assert status == 97, lines
    # Cut before its first byte reached the server: a silent peer, an info line.  Cut
    # before the server's first byte: the proxy may or may not have passed the
    # client's on by then.
    kind = {"c2s": "info", "s2c": "info|warning"}[direction] if where == "start" else "warning"
    assert_one_connection_warning("".join(lines), kind)
    assert not server_marker.exists() and not client_marker.exists()
    assert "APP" not in err + "".join(lines)


def test_openssl_s_client_cut_mid_clienthello_never_starts_the_server_application(
    server, pki, tmp_path
):
    marker = tmp_path / "server-app"
    mark = server.configure(1000, 1, "srv", f"marker={marker}")
    # 100 bytes: inside any ClientHello (the system OpenSSL's is smaller than ours).
    with FaultProxy(server.port, c2s=Fault(cut_after=100)) as proxy:
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-quiet"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        status, lines = server.connection_end(mark)
    assert result.returncode != 0
    assert status == 97, lines
    assert_one_connection_warning("".join(lines))
    assert not marker.exists()


def test_s6_tlsclient_cut_mid_server_flight_from_openssl_never_starts_its_application(
    pki, reap, tmp_path
):
    srv, port = s_server(pki)
    reap.append(srv)
    marker = tmp_path / "client-app"
    with FaultProxy(port, s2c=Fault(cut_after=300, cut="rst")) as proxy:
        code, err = finish(client(proxy.port, pki, "10", "1", "cli", f"marker={marker}"))
    assert code == 97, err
    assert_one_fatal_line(err, "s6-tlsclient")
    assert not marker.exists()


# -- cuts after the handshake -----------------------------------------------


def cut_once_received(
    proxy: FaultProxy,
    pki,
    size: int,
    how: str,
    strict: bool = False,
    started: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Run a holding s6-tlsclient through ``proxy``; cut (``how``) once it got ``size`` bytes.

    ``started``, if given, runs once the client's application started.
    Returns the client's exit code and its stderr.
    """
    cli = client(
        proxy.port,
        pki,
        "0",
        "0",
        "cli",
        "hold",
        f"progress={size}",
        tls_opts=["-J"] if strict else [],
    )
    cli_log = Log(cli.stderr)
    if started is not None:
        cli_log.wait_for("^APP cli started$")
        started()
    cli_log.wait_for(f"^APP cli progress {size}$")
    proxy.cut(how)
    code = cli.wait(timeout=30)
    cli_log.thread.join(30)
    return code, "".join(cli_log.lines)


@pytest.mark.parametrize("strict", [False, True], ids=["j", "J"])
def test_a_fin_without_close_notify_is_eof_under_j_and_exits_98_under_J(strict, server, pki):
    """The server sends 100 kB and keeps its output open; the network then ends with FIN."""
    size = 100_000
    mark = server.configure(size, 41, "srv", "hold")
    with FaultProxy(server.port) as proxy:
        code, err = cut_once_received(proxy, pki, size, "fin", strict)
        status, lines = server.connection_end(mark)
    # Everything that came before the cut is delivered, and nothing else.
    assert app_report(err, "cli") == (size, digest(payload(size, 41)))
    if strict:
        assert code == 98, err
        line = assert_one_fatal_line(err, "s6-tlsclient")
        assert line == "s6-tlsclient: fatal: peer closed the connection without close_notify"
    else:
        assert code == 0, err
        assert fatal_lines(err) == []
    assert status == 0, lines  # the server (-j) took its FIN as a plain EOF too


def test_a_reset_after_the_handshake_exits_98_on_both_sides_without_traceback(server, pki):
    size = 50_000
    mark = server.configure(size, 51, "srv", "hold")
    with FaultProxy(server.port) as proxy:
        code, err = cut_once_received(proxy, pki, size, "rst")
        status, lines = server.connection_end(mark)
    assert code == 98, err
    line = assert_one_fatal_line(err, "s6-tlsclient")
    assert line.startswith("s6-tlsclient: fatal: connection broken: "), line
    assert app_report(err, "cli") == (size, digest(payload(size, 51)))
    assert status == 98, lines
    line = assert_one_connection_warning("".join(lines))
    assert ": connection broken: " in line, line


def test_every_failure_after_a_reset_is_reported_as_a_broken_connection(pki):
    """After a reset OpenSSL reports the next failure without an errno or a reason.

    Found by the property tests as ``s6-tlsd: fatal: TLS error: `` (an empty
    reason): the first call that meets the reset gets ECONNRESET, the next
    one a bare "system library" error.  Both must read as a broken connection.
    """
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate_chain_file(pki["server_cert"])
    sctx.use_privatekey_file(pki["server_key"])
    with socket.socket() as lis:
        lis.bind(("127.0.0.1", 0))
        lis.listen(1)
        ours = socket.create_connection(lis.getsockname())
        theirs, _addr = lis.accept()
    server = SSL.Connection(sctx, theirs)
    server.set_accept_state()
    peer = SSL.Connection(SSL.Context(SSL.TLS_METHOD), ours)
    peer.set_connect_state()
    shaking = threading.Thread(target=peer.do_handshake)
    shaking.start()
    server.do_handshake()
    shaking.join(10)
    peer.sendall(b"hello")
    assert server.recv(100) == b"hello"
    set_rst_on_close(ours)
    ours.close()
    poller = select.poll()
    poller.register(theirs, select.POLLIN)
    assert poller.poll(10_000), "the reset never arrived"
    messages = []
    for op in (server.shutdown, lambda: server.send(b"more")):
        with pytest.raises(SSL.Error) as info:
            op()
        messages.append(error_reason(info.value))
    theirs.close()
    assert all(m.startswith("connection broken: ") for m in messages), messages
    assert all(not m.endswith(": ") for m in messages), messages


@pytest.mark.parametrize("strict", [False, True], ids=["j", "J"])
def test_a_fin_from_openssl_s_server_side_is_eof_under_j_and_98_under_J(strict, pki, reap):
    size = 60_000
    srv, port = s_server(pki)
    reap.append(srv)
    with FaultProxy(port) as proxy:
        code, err = cut_once_received(
            proxy,
            pki,
            size,
            "fin",
            strict,
            # see s_server_write
            started=lambda: s_server_write(srv, payload(size, 61)),
        )
    assert app_report(err, "cli") == (size, digest(payload(size, 61)))
    assert code == (98 if strict else 0), err
    if strict:
        assert_one_fatal_line(err, "s6-tlsclient")


# -- half-close and stalls --------------------------------------------------


def test_a_half_close_from_the_network_lets_the_other_direction_finish(server, pki):
    """The server sees the client's FIN (no close_notify), then answers 2 MiB."""
    up, down = 300_000, 2 * MiB
    mark = server.configure(down, 71, "srv", "after_input", f"progress={up}")
    with FaultProxy(server.port) as proxy:
        cli = client(proxy.port, pki, str(up), "72", "cli", "hold")
        server.log.wait_for(f"^APP srv progress {up}$", mark)
        proxy.half_close("c2s")
        code, err = finish(cli)
        status, lines = server.connection_end(mark)
    assert code == 0, err
    assert app_report(err, "cli") == (down, digest(payload(down, 71)))
    assert status == 0, lines
    assert app_report("".join(lines), "srv") == (up, digest(payload(up, 72)))


STALL_AT = MiB  # bytes through the stalled direction before it stalls
STALLED, FLOWING = 16 * MiB, 8 * MiB


def test_a_stalled_server_to_client_direction_does_not_stop_client_to_server(server, pki):
    mark = server.configure(STALLED, 81, "srv")
    # The client starts sending only once the stall is on its way.
    args = (str(FLOWING), "82", "cli", f"send_after={STALL_AT // 2}")
    with FaultProxy(server.port, s2c=Fault(stall_after=STALL_AT), rcvbuf=256 * 1024) as proxy:
        cli = client(proxy.port, pki, *args)
        cli_log = Log(cli.stderr)
        # All of the flowing direction arrives while the other one is stalled.
        line = server.log.wait_for(r"^APP srv (received|sent) .*", mark)
        assert line.group(1) == "received", line.group(0)
        assert proxy.stalled.is_set() and proxy.forwarded["s2c"] == STALL_AT
        proxy.release("s2c")
        code = cli.wait(timeout=60)
        cli_log.thread.join(30)
        status, lines = server.connection_end(mark)
    err = "".join(cli_log.lines)
    assert code == 0, err
    assert app_report("".join(lines), "srv") == (FLOWING, digest(payload(FLOWING, 82)))
    assert app_report(err, "cli") == (STALLED, digest(payload(STALLED, 81)))
    assert status == 0, lines


def test_a_stalled_client_to_server_direction_does_not_stop_server_to_client(server, pki):
    mark = server.configure(FLOWING, 91, "srv", f"send_after={STALL_AT // 2}")
    with FaultProxy(server.port, c2s=Fault(stall_after=STALL_AT), rcvbuf=256 * 1024) as proxy:
        cli = client(proxy.port, pki, str(STALLED), "92", "cli")
        cli_log = Log(cli.stderr)
        line = cli_log.wait_for(r"^APP cli (received|sent) .*")
        assert line.group(1) == "received", line.group(0)
        assert proxy.stalled.is_set() and proxy.forwarded["c2s"] == STALL_AT
        proxy.release("c2s")
        code = cli.wait(timeout=60)
        cli_log.thread.join(30)
        status, lines = server.connection_end(mark)
    err = "".join(cli_log.lines)
    assert code == 0, err
    assert app_report(err, "cli") == (FLOWING, digest(payload(FLOWING, 91)))
    assert app_report("".join(lines), "srv") == (STALLED, digest(payload(STALLED, 92)))
    assert status == 0, lines

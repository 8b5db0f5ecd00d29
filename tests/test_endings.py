"""How connections end, with real processes: one test per ending the lifetime machine fixes.

Each test runs the programs as users do (s6-tlsd on a socket as a super-server
hands it over, s6-tlsserver listening, s6-tlsclient connecting) against a
peer the test drives record by record (``tls_peer.TlsPeer``), and checks what
the user sees: the exit code, stderr, the time and CPU it took, and what the
application got.
"""

import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest
from conftest import program
from engine_harness import Stream, contexts, start_engine, transport
from OpenSSL import SSL
from server_helpers import END_LINE, start_server
from tls_peer import TlsPeer, client_context, connection_reset, server_context
from ucspi_helpers import LineReader, spawn_tlsc, spawn_tlsd, tcp_pair, unprefixed

from s6tls.lifetime import GRACE, LINGER

PY = [sys.executable, "-I", "-c"]
MARGIN = 6.0  # seconds of slack for a loaded machine, on top of the bounds under test


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for ``proc`` (at most ``timeout`` s); return its exit code and its CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args[:3]} did not end within {timeout} s")
        fd = os.pidfd_open(proc.pid)  # woken by the exit itself, not by a clock
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def stderr_of(proc: subprocess.Popen) -> str:
    """What ``proc`` wrote on stderr, without the peer and pid its lines name."""
    return unprefixed(proc.stderr.read().decode(errors="replace")) if proc.stderr else ""


def gone(pid: int) -> bool:
    """True when no process (not even a zombie) has ``pid`` any more."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def tlsd_env(server_env):
    return {**server_env, "PATH": os.environ["PATH"]}


def connect_peer(pki, port: int, version: int | None = None) -> TlsPeer:
    """A TLS client connected to 127.0.0.1:``port``, before its handshake."""
    sock = socket.create_connection(("127.0.0.1", port))
    return TlsPeer.on_socket(client_context(pki["ca"], version), sock)


def accept_peer(pki, conn: socket.socket) -> TlsPeer:
    """A TLS server with the test certificate on the accepted ``conn``."""
    ctx = server_context(pki["server_cert"], pki["server_key"])
    return TlsPeer.on_socket(ctx, conn, server=True)


def client_with_peer(prog: str, app: list[str], env, pki) -> tuple[subprocess.Popen, TlsPeer]:
    """s6-tlsc (the socket on its fds 6 and 7) or s6-tlsclient, against a TlsPeer server.

    The handshake is done when it returns.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        if prog == "s6-tlsclient":
            argv = [*program(prog), "-k", "localhost", "127.0.0.1", str(port), *app]
            proc = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            conn, _ = listener.accept()
        else:
            c = socket.create_connection(("127.0.0.1", port))
            conn, _ = listener.accept()
            proc = spawn_tlsc(["-k", "localhost"], app, env, c)
    peer = accept_peer(pki, conn)
    peer.handshake()
    return proc, peer


def tlsd_with_peer(args, app, env, max_version=None, pki=None):
    """s6-tlsd on one end of a loopback TCP connection, a TlsPeer on the other."""
    s, c = tcp_pair()
    proc = spawn_tlsd(args, app, env, s)
    peer = TlsPeer.on_socket(client_context(pki["ca"], max_version), c)
    peer.handshake()
    return proc, peer


# -- 1. idle timeout against a peer that stopped reading ------------------------


@pytest.mark.parametrize("close", ["-s", "-S"])
def test_the_idle_timeout_ends_a_tunnel_whose_peer_stopped_reading_without_burning_cpu(
    close, tlsd_env, pki
):
    proc, peer = tlsd_with_peer(
        [close, "--idle-timeout", "1"], ["cat", "/dev/zero"], tlsd_env, pki=pki
    )
    started = time.monotonic()
    try:
        code, cpu = wait_rusage(proc, 1 + LINGER + MARGIN)  # the peer never reads
    finally:
        peer.close()
    took = time.monotonic() - started
    assert took < 1 + LINGER + MARGIN
    assert cpu < 1.5, f"{cpu:.2f} s of CPU in {took:.2f} s: a busy loop"
    assert code == 128 + signal.SIGPIPE, stderr_of(proc)  # cat's own end: its output closed


@pytest.mark.parametrize("kind", ["socketpair", "pipes"])
def test_the_idle_timeout_ends_the_engine_on_a_stalled_reader(kind, pki):
    sctx, cctx = contexts(pki)
    net_s, net_c = transport(kind)
    server = start_engine("server", sctx, net_s, app=["cat", "/dev/zero"], idle_timeout=1.0)
    client = start_engine("client", cctx, net_c, idle_timeout=30.0)
    never = threading.Event()
    stream = Stream(client, b"", read_after=never)  # reads nothing
    report = server.wait(timeout=1 + LINGER + MARGIN)
    never.set()
    stream.join()
    client.wait()
    assert report.get("ret") == signal.SIGPIPE, report  # cat died of its closed output
    assert report["left_open"] == []


# -- 2. TLS 1.2, -S, close_notify in the middle of a large download -----------


def small_buffered_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection whose buffers hold far less than one TLS record.

    Once its client stops reading, the server's next record is half-written
    at once: the state in which a TLS 1.2 close_notify must be handled.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return server, client


@pytest.mark.parametrize("then", ["reads on", "stops reading"])
def test_a_tls12_peer_that_sends_close_notify_mid_download_gets_the_applications_status(
    then, tlsd_env, pki
):
    app = ["sh", "-c", 'trap "" PIPE; head -c 67108864 /dev/zero 2>/dev/null; exit 3']
    for _run in range(2):
        s, c = small_buffered_pair()
        proc = spawn_tlsd(["-S"], app, tlsd_env, s)
        peer = TlsPeer.on_socket(client_context(pki["ca"], SSL.TLS1_2_VERSION), c)
        try:
            peer.handshake()
            assert len(peer.recv_until_end(limit=1 << 20)) >= 1 << 20  # the download runs
            peer.close_notify()  # the client aborts, while a record of ours is half-written
            if then == "reads on":  # with room now: what is left arrives within the bound
                with socket.fromfd(peer.fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                with contextlib.suppress(SSL.Error):  # its records after our close_notify
                    peer.recv_until_end()
            code, _cpu = wait_rusage(proc, LINGER + MARGIN)
        finally:
            peer.close()
        assert (code, stderr_of(proc)) == (3, "")
        if then == "reads on":
            assert peer.close_notify_seen  # -S answered it


# -- 3. the application exits while the peer keeps sending ---------------------


def _keep_sending(peer: TlsPeer, pace: float | None, stop: threading.Event) -> None:
    """Send to the peer until ``stop``: 1 KB every ``pace`` s, or as fast as it goes."""
    block = bytes(1024 if pace else 1 << 16)
    with contextlib.suppress(OSError, SSL.Error, AssertionError):
        while not stop.is_set():
            peer.send(block, timeout=5)
            if pace:
                stop.wait(pace)


def ends_within_the_linger_bound(proc: subprocess.Popen, peer: TlsPeer, pace: float | None):
    """``peer`` keeps sending; ``proc``, whose application exits 4, must end all the same."""
    stop = threading.Event()
    sender = threading.Thread(target=_keep_sending, args=(peer, pace, stop), daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        code, _cpu = wait_rusage(proc, LINGER + MARGIN)
    finally:
        stop.set()
        sender.join(10)
        peer.close()
    assert time.monotonic() - started < LINGER + MARGIN
    assert (code, stderr_of(proc)) == (4, "")


@pytest.mark.parametrize("pace", [0.05, None], ids=["chatty", "endless"])
def test_s6_tlsd_ends_within_the_linger_bound_when_the_application_exits_and_the_peer_sends(
    pace, tlsd_env, pki
):
    proc, peer = tlsd_with_peer([], ["sh", "-c", "echo bye; exit 4"], tlsd_env, pki=pki)
    ends_within_the_linger_bound(proc, peer, pace)


@pytest.mark.parametrize("pace", [0.05, None], ids=["chatty", "endless"])
def test_s6_tlsclient_ends_within_the_linger_bound_when_the_application_exits_and_the_peer_sends(
    pace, client_env, pki
):
    proc, peer = client_with_peer(
        "s6-tlsclient", ["sh", "-c", "echo hi >&7; exit 4"], client_env, pki
    )
    ends_within_the_linger_bound(proc, peer, pace)


# -- 4. an error after the handshake, under s6-tlsserver -c 1 ------------------

SIGTERM_APP = """
import os, signal, sys
log = sys.argv[1]
with open(log, "a") as f: f.write(f"start {os.getpid()}\\n")
try:
    os.write(1, b"ready\\n")
except BrokenPipeError:  # its output may be closed already: it stays anyway
    pass
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
signal.sigwait([signal.SIGTERM])  # its input may close: it stays until SIGTERM
with open(log, "a") as f: f.write(f"end {os.getpid()}\\n")
"""


def test_a_bad_record_after_the_handshake_keeps_the_slot_until_the_application_is_gone(
    server_env, pki, tmp_path
):
    log = tmp_path / "apps.log"
    env = {**server_env, "PATH": os.environ["PATH"]}
    server, port = start_server(["-v", "-c", "1"], [*PY, SIGTERM_APP, str(log)], env)
    errors = LineReader(server.stderr)
    try:
        first = connect_peer(pki, port)
        first.handshake()
        deadline = time.monotonic() + 20
        first.write_raw(b"\x17\x03\x03\x00\x20" + os.urandom(32), deadline)  # a bad record
        while True:  # the server's line for the end of that connection's child
            line = errors.readline(timeout=GRACE + MARGIN)
            if END_LINE.search(line):
                break
        first.close()
        second = connect_peer(pki, port)
        second.handshake()
        assert second.recv() == b"ready\n"  # its application has started
        second.close()
    finally:
        server.send_signal(signal.SIGQUIT)  # its children get SIGTERM
        server.communicate(timeout=30)
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events[:3] == ["start", "end", "start"], log.read_text()


# -- 5. signals reach the application ------------------------------------------


def _pid_line(data: bytes) -> int:
    return int(data.split(b"\n", 1)[0])


def signal_reaches_the_application(proc: subprocess.Popen, peer: TlsPeer, sig: int) -> None:
    """The application sends its pid first; ``sig`` to ``proc`` must end it, and ``proc``
    must exit with its status, saying nothing."""
    try:
        app = _pid_line(peer.recv())
        proc.send_signal(sig)
        code, _cpu = wait_rusage(proc, MARGIN)
    finally:
        peer.close()
    assert code == 128 + sig
    assert stderr_of(proc) == ""
    assert gone(app)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_s6_tlsd_reaches_the_application_and_its_status_is_ours(sig, tlsd_env, pki):
    proc, peer = tlsd_with_peer([], ["sh", "-c", "echo $$; exec sleep 600"], tlsd_env, pki=pki)
    signal_reaches_the_application(proc, peer, sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("prog", ["s6-tlsc", "s6-tlsclient"])
def test_a_signal_to_the_client_programs_reaches_the_application(sig, prog, client_env, pki):
    app = ["sh", "-c", "echo $$ >&7; exec sleep 600"]
    proc, peer = client_with_peer(prog, app, client_env, pki)
    signal_reaches_the_application(proc, peer, sig)


def test_sigquit_to_s6_tlsserver_reaches_the_applications_as_sigterm(server_env, pki):
    """s6-tlsserver serves no connection in a process of its own: SIGQUIT is how
    the applications get SIGTERM; the connection's status is theirs."""
    env = {**server_env, "PATH": os.environ["PATH"]}
    server, port = start_server(["-v"], ["sh", "-c", "echo $$; exec sleep 600"], env)
    errors = LineReader(server.stderr)
    try:
        peer = connect_peer(pki, port)
        peer.handshake()
        app = _pid_line(peer.recv())
        server.send_signal(signal.SIGQUIT)
        lines = []
        while not any(f" pid {app} status " in line for line in lines):
            lines.append(errors.readline(timeout=MARGIN))
        peer.close()
        _out, rest = server.communicate(timeout=30)
    finally:
        server.kill()
    assert any(f" pid {app} status {128 + signal.SIGTERM}" in line for line in lines), lines
    assert "internal error" not in "\n".join(lines) + rest.decode()
    assert gone(app)


def test_ctrl_c_during_the_handshake_kills_s6_tlsd_quietly(tlsd_env, pki):
    s, c = tcp_pair()
    proc = spawn_tlsd([], ["cat"], tlsd_env, s)
    peer = TlsPeer.on_socket(client_context(pki["ca"]), c)
    try:
        with contextlib.suppress(SSL.WantReadError):
            peer.conn.do_handshake()
        deadline = time.monotonic() + 20
        peer.flush(deadline)  # our ClientHello
        assert peer.read_raw(deadline)  # its ServerHello: it is in the handshake now
        proc.send_signal(signal.SIGINT)
        code, _cpu = wait_rusage(proc, MARGIN)
    finally:
        peer.close()
    assert code == -signal.SIGINT
    assert stderr_of(proc) == ""


# -- 6. authenticated data still reaches the application after an error --------

SLOW_READER = """
import os, sys, time
os.close(1)
with open(sys.argv[1], "wb") as f:
    while chunk := os.read(0, 4096):
        f.write(chunk)
        f.flush()
        time.sleep(0.002)
"""


def test_data_received_before_a_bad_record_reaches_an_application_still_reading_it(
    tlsd_env, pki, tmp_path
):
    got = tmp_path / "got"
    # Its output ends first; then it reads, slowly: data waits for it in the engine.
    app = [*PY, SLOW_READER, str(got)]
    proc, peer = tlsd_with_peer([], app, tlsd_env, pki=pki)
    # Not a multiple of the engine's 64 KiB buffer: bytes still wait in it
    # when the bad record is read.
    data = os.urandom((1 << 20) + 40000)
    try:
        assert peer.recv() == b""  # its output ended: our EOF
        peer.send(data)
        peer.write_raw(b"\x17\x03\x03\x00\x20" + os.urandom(32), time.monotonic() + 20)
        code, _cpu = wait_rusage(proc, GRACE * 2 + MARGIN)
    finally:
        peer.close()
    assert code == 98
    assert got.read_bytes() == data  # every authenticated byte, none after the fault
    assert "s6-tlsd: fatal: TLS error: " in stderr_of(proc)


# -- 7. our last alert reaches the peer before the FIN -------------------------


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["1.2", "1.3"])
def test_the_peer_reads_our_alert_before_the_fin(version, server_env, pki):
    env = {**server_env, "PATH": os.environ["PATH"]}
    server, port = start_server([], ["cat"], env)
    try:
        for _run in range(10):
            peer = connect_peer(pki, port, version)
            peer.handshake()
            deadline = time.monotonic() + 20
            # a record that fails to decrypt, then more that will never be read
            peer.write_raw(b"\x17\x03\x03\x00\x40" + os.urandom(64) + os.urandom(1 << 16), deadline)
            raw = b""
            try:
                while chunk := peer.read_raw(deadline):
                    raw += chunk
            except OSError as exc:
                assert not connection_reset(exc), "a RST destroyed our alert"
                raise
            peer.conn.bio_write(raw)
            with pytest.raises(SSL.Error, match="alert"):
                peer.conn.recv(1 << 16)
            peer.close()
    finally:
        server.terminate()
        server.communicate(timeout=30)


# -- 8. -K against a peer that trickles one byte at a time ---------------------


def test_K_bounds_a_handshake_that_trickles_one_byte_at_a_time(tlsd_env):
    """A record header announcing 16 KiB, then its bytes one at a time (a slowloris)."""
    s, c = tcp_pair()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    proc = spawn_tlsd(["-K", "300"], ["cat"], tlsd_env, s)
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            c.send(b"\x16\x03\x01\x40\x00")  # a handshake record of 16384 bytes
            for _ in range(16384):
                if stop.wait(0.0002):
                    return
                c.send(b"\x00")

    sender = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        code, _cpu = wait_rusage(proc, 0.3 + MARGIN)
    finally:
        stop.set()
        sender.join(10)
        c.close()
    assert (code, stderr_of(proc)) == (98, "s6-tlsd: fatal: handshake timed out\n")
    assert time.monotonic() - started < 0.3 + MARGIN


# -- 10. one descriptor that is not a socket -----------------------------------


def test_one_descriptor_that_is_not_a_socket_carries_tls(pki):
    """The library on one pty descriptor (a serial line): the link takes memory BIOs."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    sctx, _cctx = contexts(pki)
    server = start_engine("server", sctx, (slave, slave))  # closes our copy of slave
    peer = TlsPeer(client_context(pki["ca"]), master)
    try:
        peer.handshake()
        os.write(server.to_engine, b"over a serial line\n")
        os.close(server.to_engine)
        assert peer.recv() == b"over a serial line\n"
        peer.send(b"and back\n")
        assert os.read(server.from_engine, 100) == b"and back\n"
    finally:
        peer.close()
        os.close(server.from_engine)
    report = server.wait()
    assert report.get("error") in (None, "TlsRuntimeError"), report  # the pty's end is abrupt
    assert report["left_open"] == [], report

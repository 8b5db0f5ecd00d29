"""No early cleartext: every failed handshake leaves the application unstarted.

The applications here create a marker file first thing and save what they
receive, so "never started" is a file that does not exist.  Each way a
handshake can fail is paired with the success that proves the check means
something (the same setup with the right CA, name or certificate).

* peer checks: untrusted CA, wrong name (-k), no client certificate under -y,
  a client certificate from another CA under -Y and -y;
* hostile bytes: plaintext HTTP, random bytes, a truncated ClientHello, a
  silent peer (-K), on the server and on the client side;
* random bytes from the network (hypothesis) into s6-tlsd: exit 97 with one
  stderr line and no traceback, or, when the bytes stop without an EOF, the
  -K expiry (98, "handshake timed out") and never later than -K allows;
* client-initiated renegotiation (TLS 1.2) is refused (OP_NO_RENEGOTIATION).
"""

import contextlib
import os
import re
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import STARTED, program, write_leaf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from server_helpers import start_server
from test_properties import fork_tlsd
from ucspi_helpers import unprefixed

SLOW = os.environ.get("S6TLS_SLOW") == "1"
TIMEOUT = 30

SERVER_APP = 'touch "$MARK/server-started"; env >"$MARK/server-env"; cat >"$MARK/server-got"'
CLIENT_APP = 'touch "$MARK/client-started"; echo early >&7; exec 7>&-; cat <&6 >"$MARK/client-got"'


def popen(*args, **kwargs) -> subprocess.Popen:
    proc = subprocess.Popen(*args, **kwargs)
    STARTED.append(proc)
    return proc


def started(mark: Path) -> set[str]:
    return {name for name in ("server-started", "client-started") if (mark / name).exists()}


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(TIMEOUT)
    return sock


def start_tlsd(args: list[str], env: dict, conn: socket.socket) -> subprocess.Popen:
    """s6-tlsd on the accepted connection ``conn`` (its stdin and stdout), SERVER_APP as prog."""
    proc = popen(
        [*program("s6-tlsd"), *args, "--", "sh", "-c", SERVER_APP],
        stdin=conn,
        stdout=conn,
        stderr=subprocess.PIPE,
        env=env,
    )
    conn.close()
    return proc


def run_pair(server_args, server_env, client_args, client_env):
    """s6-tlsclient (CLIENT_APP) against s6-tlsd (SERVER_APP); both results."""
    with listener() as lis:
        cli = popen(
            [
                *program("s6-tlsclient"),
                *client_args,
                "127.0.0.1",
                str(lis.getsockname()[1]),
                "sh",
                "-c",
                CLIENT_APP,
            ],
            env=client_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            conn, _addr = lis.accept()
        except TimeoutError:
            cli.kill()
            raise AssertionError(f"s6-tlsclient never connected: {cli.communicate()[1]}") from None
    srv = start_tlsd(server_args, server_env, conn)
    results = []
    for proc in (srv, cli):
        _out, err = proc.communicate(timeout=TIMEOUT)
        results.append((proc.returncode, err.decode()))
    return results


def one_fatal_line(err: str, prog: str) -> str:
    assert "Traceback" not in err, err
    lines = unprefixed(err).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: fatal: "), err
    return lines[0]


@pytest.fixture
def mark(tmp_path) -> Path:
    return tmp_path


@pytest.fixture
def envs(pki, mark, tmp_path_factory, other_ca):
    """Environments: server, client, and a client with a certificate from another CA."""
    d = tmp_path_factory.mktemp("rogue")
    rogue = other_ca.issue_cert("client.example")
    write_leaf(rogue, d / "cert.pem", d / "key.pem")
    base = {**os.environ, "MARK": str(mark)}
    return {
        "server": {**base, "CERTFILE": pki["server_cert"], "KEYFILE": pki["server_key"]},
        "server_ca": {
            **base,
            "CERTFILE": pki["server_cert"],
            "KEYFILE": pki["server_key"],
            "CAFILE": pki["ca"],
        },
        "client": {**base, "CAFILE": pki["ca"]},
        "client_other_ca": {**base, "CAFILE": pki["other_ca"]},
        "client_cert": {
            **base,
            "CAFILE": pki["ca"],
            "CERTFILE": pki["client_cert"],
            "KEYFILE": pki["client_key"],
        },
        "client_rogue": {
            **base,
            "CAFILE": pki["ca"],
            "CERTFILE": str(d / "cert.pem"),
            "KEYFILE": str(d / "key.pem"),
        },
    }


# -- the peer checks, each with the success that pairs it --------------------

K = ["-k", "localhost"]
CHECKS = {
    # name: server args, server env, client args, client env, client rejects?
    "untrusted CA": ([], "server", K, "client_other_ca", True),
    "wrong name": ([], "server", ["-k", "wrong.example"], "client", True),
    "no client certificate under -y": (["-y"], "server_ca", K, "client", False),
    "certificate from another CA under -y": (
        ["-y"],
        "server_ca",
        ["-y", *K],
        "client_rogue",
        False,
    ),
    "certificate from another CA under -Y": (
        ["-Y"],
        "server_ca",
        ["-y", *K],
        "client_rogue",
        False,
    ),
}
SUCCESSES = {
    "trusted CA": ([], "server", K, "client"),
    "client certificate under -y": (["-y"], "server_ca", ["-y", *K], "client_cert"),
    "no client certificate under -Y": (["-Y"], "server_ca", K, "client"),
}


@pytest.mark.parametrize("name", CHECKS)
def test_a_rejected_peer_never_starts_the_server_application(name, envs, mark):
    server_args, server_env, client_args, client_env, client_rejects = CHECKS[name]
    (scode, serr), (ccode, cerr) = run_pair(
        server_args, envs[server_env], client_args, envs[client_env]
    )
    assert scode == 97, serr
    one_fatal_line(serr, "s6-tlsd")
    assert "server-started" not in started(mark)
    assert not (mark / "server-got").exists()
    if client_rejects:
        # The client rejects the server inside the handshake: neither side starts.
        assert ccode == 97, cerr
        line = one_fatal_line(cerr, "s6-tlsclient")
        assert "certificate" in line, line
        assert started(mark) == set()
    else:
        # TLS 1.3: the client's handshake ends with its Finished, before the
        # server's verdict on its certificate; so the client's application may
        # start, then sees the server's alert: exit 98 (or 97 when the alert
        # comes first).  It never receives a byte either way (s6-tlsclient
        # exits at once and the application sees EOF on its input).
        assert ccode in (97, 98), cerr
        line = one_fatal_line(cerr, "s6-tlsclient")
        assert "alert" in line, line
        got = mark / "client-got"
        assert not got.exists() or got.read_bytes() == b""


@pytest.mark.parametrize("name", SUCCESSES)
def test_the_same_setup_with_the_right_peer_starts_both_applications(name, envs, mark):
    server_args, server_env, client_args, client_env = SUCCESSES[name]
    (scode, serr), (ccode, cerr) = run_pair(
        server_args, envs[server_env], client_args, envs[client_env]
    )
    assert (scode, ccode) == (0, 0), (serr, cerr)
    assert started(mark) == {"server-started", "client-started"}
    assert (mark / "server-got").read_bytes() == b"early\n"
    env = (mark / "server-env").read_text()
    assert ("SSL_PEER_CERT_HASH=SHA256:" in env) == ("cert" in client_env), env


# -- hostile bytes --------------------------------------------------------------


def client_hello(tls12: bool = False) -> bytes:
    """A real ClientHello, as pyOpenSSL sends it first."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if tls12:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def hostile_client(data: bytes, fin: bool, args: list[str], env: dict) -> tuple:
    """Send ``data`` to s6-tlsd, then EOF if ``fin``; return code, stderr, seconds."""
    with listener() as lis:
        ours = socket.create_connection(lis.getsockname())
        conn, _addr = lis.accept()
    t0 = time.monotonic()
    srv = start_tlsd(args, env, conn)
    ours.sendall(data)
    if fin:
        ours.shutdown(socket.SHUT_WR)
    try:
        _out, err = srv.communicate(timeout=TIMEOUT)
    finally:
        ours.close()
    return srv.returncode, err.decode(), time.monotonic() - t0


HOSTILE = {
    "plaintext HTTP": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", True),
    "random bytes": (bytes(range(256)) * 4, True),
    "TLS record header then EOF": (b"\x16\x03\x01\x02\x00", True),
    "half a ClientHello then EOF": ("half", True),
    "a whole ClientHello then EOF": ("whole", True),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bytes_then_eof_exit_97_without_starting_the_application(name, envs, mark):
    data, fin = HOSTILE[name]
    if data in ("half", "whole"):
        hello = client_hello()
        data = hello[: len(hello) // 2] if data == "half" else hello
    code, err, _secs = hostile_client(data, fin, ["-K", "10000"], envs["server"])
    assert code == 97, err
    one_fatal_line(err, "s6-tlsd")
    assert started(mark) == set()


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello", "a whole ClientHello"])
def test_a_peer_that_stalls_the_handshake_hits_K_and_exits_98(sent, envs, mark):
    hello = client_hello()
    data = {"nothing": b"", "half a ClientHello": hello[:100], "a whole ClientHello": hello}[sent]
    code, err, secs = hostile_client(data, False, ["-K", "300"], envs["server"])
    assert code == 98, err
    assert one_fatal_line(err, "s6-tlsd") == "s6-tlsd: fatal: handshake timed out"
    assert started(mark) == set()
    assert secs < 5, secs  # 0.3 s of -K plus start-up; never an open-ended wait


@pytest.mark.parametrize("behaviour", ["answers plaintext", "stays silent"])
def test_a_hostile_server_never_starts_the_client_application(behaviour, envs, mark):
    with listener() as lis:
        cli = popen(
            [
                *program("s6-tlsclient"),
                "-K",
                "300",
                "-k",
                "localhost",
                "127.0.0.1",
                str(lis.getsockname()[1]),
                "sh",
                "-c",
                CLIENT_APP,
            ],
            env=envs["client"],
            stderr=subprocess.PIPE,
        )
        conn, _addr = lis.accept()
    with conn:
        if behaviour == "answers plaintext":
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            conn.shutdown(socket.SHUT_WR)
        _out, err = cli.communicate(timeout=TIMEOUT)
    line = one_fatal_line(err.decode(), "s6-tlsclient")
    if behaviour == "answers plaintext":
        assert cli.returncode == 97, err
    else:
        assert (cli.returncode, line) == (98, "s6-tlsclient: fatal: handshake timed out")
    assert started(mark) == set()


# -- random bytes (hypothesis) --------------------------------------------------

K_MS = 200


def mutated_hello(draw_hello: bytes, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(draw_hello)
    for pos, value in flips:
        data[pos % len(data)] = value
    return bytes(data)


HELLO = client_hello()
HELLO12 = client_hello(tls12=True)
hostile_bytes = st.one_of(
    st.binary(max_size=4096),
    # something that looks like a TLS handshake record, with a random body
    st.builds(
        lambda n, body: b"\x16\x03\x01" + n.to_bytes(2, "big") + body,
        st.integers(0, 0xFFFF),
        st.binary(max_size=2048),
    ),
    # a real ClientHello, truncated and with some bytes changed
    st.builds(
        lambda hello, cut, flips: mutated_hello(hello[:cut], flips) if cut else b"",
        st.sampled_from([HELLO, HELLO12]),
        st.integers(0, len(HELLO)),
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
    ),
)


@pytest.fixture(scope="module")
def net_listener():
    with listener() as sock:
        yield sock


def test_random_bytes_from_the_network_never_start_the_application(pki, tmp_path, net_listener):
    marker = tmp_path / "started"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
        "MARKER": str(marker),
    }
    argv = ["-K", str(K_MS), "--", "sh", "-c", 'touch "$MARKER"; cat >/dev/null']
    counts = {"97": 0, "98 handshake timed out": 0}

    @settings(
        max_examples=1000 if SLOW else 30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(data=hostile_bytes, fin=st.booleans())
    def prop(data: bytes, fin: bool) -> None:
        ours = socket.create_connection(net_listener.getsockname())
        theirs, _addr = net_listener.accept()
        t0 = time.monotonic()
        pid, pidfd, err_r = fork_tlsd(argv, theirs, env, (ours, net_listener))
        theirs.close()
        try:
            ours.settimeout(1)
            try:
                ours.sendall(data)
                if fin:
                    ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # s6-tlsd may already have given up and closed
            # Never later than -K allows (plus generous start-up slack).
            if not select.select([pidfd], [], [], K_MS / 1000 + 5)[0]:
                os.kill(pid, 9)
                raise AssertionError("s6-tlsd outlived -K")
            _pid, status = os.waitpid(pid, 0)
        finally:
            ours.close()
            os.close(pidfd)
        elapsed = time.monotonic() - t0
        os.set_blocking(err_r, False)
        try:
            err = os.read(err_r, 65536).decode()
        except BlockingIOError:
            err = ""
        os.close(err_r)
        code = os.waitstatus_to_exitcode(status)
        assert not marker.exists(), "the application was started"
        line = one_fatal_line(err, "s6-tlsd")
        if code == 98:
            assert line == "s6-tlsd: fatal: handshake timed out", line
            assert not fin, "an EOF must end the handshake at once, with 97"
            counts["98 handshake timed out"] += 1
        else:
            assert code == 97, (code, err)
            assert elapsed < K_MS / 1000 + 5
            counts["97"] += 1

    prop()
    print(f"random bytes into s6-tlsd: {counts}")


# -- a forged record once the application ended its output ---------------------


def test_a_forged_record_after_the_application_closed_its_output_is_98_not_eof(envs, pki, mark):
    """The application closed its output and still reads: tampering is an error.

    A valid record, then one with a flipped byte.  The application gets the
    first and nothing after it; s6-tlsd exits 98 naming the bad record, and
    never hands the application a clean EOF as if the peer had finished.
    (The engine briefly did so: any error once the application had ended its
    output closed the application's input, and the exit was its status 0.)
    """
    app = 'exec >&-; touch "$MARK/server-started"; cat >"$MARK/server-got"'
    with listener() as lis:
        ours = socket.create_connection(lis.getsockname())
        conn, _addr = lis.accept()
    srv = popen(
        [*program("s6-tlsd"), "--", "sh", "-c", app],
        stdin=conn,
        stdout=conn,
        stderr=subprocess.PIPE,
        env=envs["server"],
    )
    conn.close()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.load_verify_locations(pki["ca"])
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    tls = SSL.Connection(ctx, None)
    tls.set_connect_state()
    tls.set_tlsext_host_name(b"localhost")
    ours.settimeout(TIMEOUT)
    eof = False
    while not eof:  # the handshake, then everything until s6-tlsd's EOF (-s: a FIN)
        with contextlib.suppress(SSL.WantReadError):
            if tls.get_state_string() != b"SSL negotiation finished successfully":
                tls.do_handshake()
            else:
                with contextlib.suppress(SSL.ZeroReturnError):
                    assert tls.recv(65536) == b"", "the application sent nothing"
        with contextlib.suppress(SSL.WantReadError):
            ours.sendall(tls.bio_read(65536))
        data = ours.recv(65536)
        if data:
            tls.bio_write(data)
        else:
            eof = True
    tls.sendall(b"good\n")
    ours.sendall(tls.bio_read(65536))
    tls.sendall(b"evil\n")
    forged = bytearray(tls.bio_read(65536))
    forged[-1] ^= 0x01  # the last byte of the record's authentication tag
    ours.sendall(bytes(forged))
    _out, err = srv.communicate(timeout=TIMEOUT)
    ours.close()
    assert srv.returncode == 98, err
    line = one_fatal_line(err.decode(), "s6-tlsd")
    assert "bad record mac" in line or "decryption failed" in line, line
    assert (mark / "server-got").read_bytes() == b"good\n"


# -- renegotiation --------------------------------------------------------------


def test_client_initiated_renegotiation_is_refused_under_tls12(envs, pki, mark):
    """s6tls sets OP_NO_RENEGOTIATION: what a TLS 1.2 client asking for it gets.

    The server answers the renegotiating ClientHello with a no_renegotiation
    warning alert; OpenSSL's client gives up ("no renegotiation") and sends a
    fatal handshake_failure alert; s6-tlsd then exits 98 with one line.  The
    application got what was sent before, and nothing after.
    """
    with listener() as lis:
        ours = socket.create_connection(lis.getsockname())
        conn, _addr = lis.accept()
    srv = start_tlsd([], envs["server"], conn)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.load_verify_locations(pki["ca"])
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    tls = SSL.Connection(ctx, ours)
    tls.set_connect_state()
    tls.set_tlsext_host_name(b"localhost")
    tls.do_handshake()
    assert tls.get_protocol_version_name() == "TLSv1.2"
    tls.sendall(b"before\n")
    assert tls.renegotiate()
    with pytest.raises(SSL.Error, match="no renegotiation"):
        tls.do_handshake()
        tls.recv(100)  # the refusal may only show on the next read
    with pytest.raises(SSL.Error):
        tls.sendall(b"after\n")
    assert tls.total_renegotiations() == 1  # asked for, never completed
    ours.close()
    _out, err = srv.communicate(timeout=TIMEOUT)
    assert srv.returncode == 98, err
    line = one_fatal_line(err.decode(), "s6-tlsd")
    assert line == "s6-tlsd: fatal: TLS error: tls alert handshake failure"
    assert (mark / "server-got").read_bytes() == b"before\n"


def test_openssl_s_client_R_command_is_refused_and_the_session_ends(server_env, pki, reap):
    server, port = start_server(["-v"], ["cat"], server_env)
    reap.append(server)
    cli = popen(
        [
            "openssl",
            "s_client",
            "-tls1_2",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            pki["ca"],
            "-no_ign_eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    reap.append(cli)
    cli.stdin.write(b"hello\n")
    cli.stdin.flush()
    for line in cli.stdout:  # the echo proves the session is up
        if line == b"hello\n":
            break
    cli.stdin.write(b"R\nafter\n")
    cli.stdin.close()
    out = cli.stdout.read().decode()
    assert cli.wait(timeout=TIMEOUT) != 0
    assert "RENEGOTIATING" in out and "no renegotiation" in out, out
    assert "after" not in out  # nothing went through once renegotiation was refused
    server.terminate()
    _out, err = server.communicate(timeout=TIMEOUT)
    warning = r"s6-tlsserver: warning: peer \S+ pid \d+: TLS error: tls alert handshake failure"
    assert re.search(warning, err.decode()), err
    assert "status 98" in err.decode()

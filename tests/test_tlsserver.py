"""s6-tlsserver and s6-tlsclient as real processes: variables, load, limits, signals."""

import hashlib
import os
import re
import resource
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import program, write_leaf
from server_helpers import (
    APPS,
    END_LINE,
    child_pids,
    fd_count,
    start_server,
    tls_connect,
    zombies,
)
from ucspi_helpers import LineReader, connection_fatal

PRINT_ENV = [sys.executable, "-c", "import os,sys; sys.stdout.write(repr(dict(os.environ)))"]
CLIENT_PRINT_ENV = [
    sys.executable,
    "-c",
    "import os; os.close(7); reply = os.read(6, 1 << 20)\n"
    "while chunk := os.read(6, 1 << 20): reply += chunk\n"
    "print(repr((dict(os.environ), eval(reply))))",
]


def read_log_until(proc: subprocess.Popen, needle: str, count: int = 1) -> list[str]:
    """Read the server's stderr until ``needle`` was seen ``count`` times; return the lines."""
    assert proc.stderr is not None
    lines: list[str] = []
    seen = 0
    while seen < count:
        line = proc.stderr.readline().decode()
        assert line, f"server log ended before {needle!r}: {lines}"
        lines.append(line)
        seen += needle in line
    return lines


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    return proc.returncode


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_round_trip_gives_both_applications_their_tls_and_tcp_variables(
    host, server_env, pki, reap
):
    server, port = start_server([], PRINT_ENV, server_env, host)
    reap.append(server)
    client = subprocess.run(
        [*program("s6-tlsclient"), "-k", "localhost", host, str(port), *CLIENT_PRINT_ENV],
        env={**os.environ, "CAFILE": pki["ca"]},
        capture_output=True,
        timeout=30,
    )
    assert client.returncode == 0, client.stderr
    client_env, server_seen = eval(client.stdout)
    assert server_seen["PROTO"] == "TCP"
    assert server_seen["TCPREMOTEIP"] == host
    assert server_seen["TCPLOCALIP"] == host
    assert server_seen["TCPLOCALPORT"] == str(port)
    assert server_seen["TCPREMOTEPORT"] == client_env["TCPLOCALPORT"]
    assert server_seen["TCPCONNNUM"] == "0"
    assert server_seen["SSL_PROTOCOL"] == "TLSv1.3"
    assert server_seen["SSL_TLS_SNI_SERVERNAME"] == "localhost"
    assert "SSL_PEER_CERT_HASH" not in server_seen
    assert "CERTFILE" not in server_seen and "KEYFILE" not in server_seen
    assert client_env["PROTO"] == "TCP"
    assert client_env["TCPREMOTEIP"] == host
    assert client_env["TCPREMOTEPORT"] == str(port)
    assert client_env["SSL_CIPHER"] == server_seen["SSL_CIPHER"]
    assert client_env["SSL_PEER_CERT_HASH"].startswith("SHA256:")
    assert "CAFILE" not in client_env
    assert stop(server) == 0


def test_client_uses_the_host_as_server_name_and_rejects_a_wrong_one(server_env, pki, reap):
    server, port = start_server([], ["cat"], server_env)
    reap.append(server)
    env = {**os.environ, "CAFILE": pki["ca"]}
    good = subprocess.run(
        [*program("s6-tlsclient"), "localhost", str(port), "true"],
        env=env,
        timeout=30,
        capture_output=True,
    )
    assert good.returncode == 0, good.stderr
    bad = subprocess.Popen(
        [*program("s6-tlsclient"), "-k", "wrong.example", "127.0.0.1", str(port), "true"],
        env=env,
        stderr=subprocess.PIPE,
    )
    _out, err = bad.communicate(timeout=30)
    assert bad.returncode == 97
    # its line names the server and its own pid, as every line about a connection does
    line = connection_fatal(err.decode().rstrip("\n"), "s6-tlsclient", bad.pid)
    assert line.startswith("certificate does not match the server name wrong.example"), line
    assert f":{port} pid" in err.decode()


def test_fifty_concurrent_connections_move_a_mebibyte_each_way_without_loss(server_env, pki, reap):
    server, port = start_server(["-v", "-c", "60", "-C", "60"], ["cat"], server_env)
    reap.append(server)
    warm = tls_connect(port, pki["ca"])  # steady state first: the workers started
    warm.close()
    read_log_until(server, "info: end ")
    processes = [server.pid, *child_pids(server.pid)]  # the supervisor and its workers
    fds_before = [fd_count(pid) for pid in processes]
    env = {**os.environ, "CAFILE": pki["ca"]}
    clients = [
        subprocess.Popen(
            [
                *program("s6-tlsclient"),
                "-q",
                "-k",
                "localhost",
                "127.0.0.1",
                str(port),
                sys.executable,
                str(APPS / "echo_check.py"),
                str(1 << 20),
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        for _ in range(50)
    ]
    reap.extend(clients)
    results = [(c.wait(timeout=120), c.stderr.read().decode()) for c in clients]
    assert [code for code, _err in results] == [0] * 50, results
    for _code, err in results:
        sent, got = err.split()[2], err.split()[5]
        assert sent == got
    read_log_until(server, "info: end ", 50)  # every connection over, as the server logs it
    assert [zombies(pid) for pid in processes] == [[] for _ in processes]
    assert [fd_count(pid) for pid in processes] == fds_before
    assert stop(server) == 0


def test_connections_above_c_are_refused_and_counted_per_ip_with_C(server_env, pki, reap):
    server, port = start_server(["-v", "-c", "2"], ["cat"], server_env)
    reap.append(server)
    held = [tls_connect(port, pki["ca"]) for _ in range(2)]
    for conn in held:  # a round trip: the server's side of the handshake is done too
        conn.sendall(b"running")
        assert conn.recv(100) == b"running"
    read_log_until(server, "allow", 2)
    with pytest.raises((ssl.SSLError, OSError)):
        extra = tls_connect(port, pki["ca"])
        extra.sendall(b"x")
        assert extra.recv(1) == b""  # TLS 1.3: the refusal may show only on first read
        raise ConnectionResetError("refused after the handshake")
    line = read_log_until(server, "refused")[-1]  # within a second: the first after a quiet time
    assert re.search(r"warning: refused 1 connection \(1 over -c 2\) in the last \d+ s$", line)
    for conn in held:
        conn.sendall(b"still here")
        assert conn.recv(100) == b"still here"
        conn.close()
    stop(server)


def test_sigterm_drops_handshakes_at_once_and_lets_running_connections_finish(
    server_env, pki, reap
):
    server, port = start_server(["-v"], ["cat"], server_env)
    reap.append(server)
    conn = tls_connect(port, pki["ca"])
    conn.sendall(b"before")  # an answer: the server's side of the handshake is done too
    assert conn.recv(100) == b"before"
    silent = socket.create_connection(("127.0.0.1", port), timeout=30)  # never says hello
    read_log_until(server, "allow", 2)
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    lines = read_log_until(server, "stopped accepting")
    assert lines[-1].endswith("stopped accepting, 1 connection running, 1 handshake dropped\n")
    assert silent.recv(1) == b""  # dropped: EOF at once, not after -K (10 s by default)
    assert time.monotonic() - started < 5
    silent.close()
    with pytest.raises(ConnectionRefusedError):
        tls_connect(port, pki["ca"])
    conn.sendall(b"after SIGTERM")
    assert conn.recv(100) == b"after SIGTERM"
    assert server.poll() is None  # still draining
    conn.close()
    server.communicate(timeout=20)
    assert server.returncode == 0


@pytest.mark.parametrize("args", [[], ["-K", "0"]])
def test_sixty_silent_sockets_never_keep_a_real_client_out(server_env, pki, reap, args):
    """-c 40: a new connection takes the slot of the oldest connection still early,
    so silent sockets cannot hold the slots, even with no handshake timeout (-K 0)."""
    server, port = start_server(args, ["cat"], server_env)
    reap.append(server)
    silent = [  # from another address than the real client's
        socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.2", 0))
        for _ in range(60)
    ]
    started = time.monotonic()
    conn = tls_connect(port, pki["ca"])
    conn.sendall(b"real client")
    assert conn.recv(100) == b"real client"
    took = time.monotonic() - started
    assert took < 1, took
    conn.close()
    for sock in silent:
        sock.close()
    stop(server)


def test_a_second_connection_from_one_address_is_refused_under_C_1(server_env, pki, reap):
    server, port = start_server(["-C", "1"], ["cat"], server_env, host="::")
    reap.append(server)
    log = LineReader(server.stderr)
    for host, shown in (("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")):
        held = tls_connect(port, pki["ca"], host)  # one connection from this address
        held.sendall(b"held")
        assert held.recv(100) == b"held"
        extra = socket.create_connection((host, port), timeout=30)
        assert extra.recv(1) == b""  # accepted and closed at once
        ip = host
        peer = f"{shown}:{extra.getsockname()[1]}"
        line = log.readline()  # within a second: the first after a quiet time
        assert re.fullmatch(
            r"s6-tlsserver: warning: refused 1 connection \(1 over -C 1\) in the last \d+ s", line
        ), (line, peer, ip)
        extra.close()
        held.close()
    stop(server)


def test_a_failed_connection_is_a_warning_naming_the_peer_and_the_pid(server_env, reap):
    server, port = start_server([], ["cat"], server_env)
    reap.append(server)
    http = socket.create_connection(("127.0.0.1", port), timeout=30)
    http.sendall(b"GET / HTTP/1.0\r\n\r\n")
    line = LineReader(server.stderr).readline()
    peer = f"127.0.0.1:{http.getsockname()[1]}"
    assert re.fullmatch(rf"s6-tlsserver: warning: peer {peer} pid \d+: http request", line), line
    http.close()
    assert stop(server) == 0  # a connection's failure is the connection's, not the server's


def test_accept_errors_are_one_warning_and_the_server_goes_on(server_env, pki, reap):
    server, port = start_server(["-v"], ["cat"], server_env)
    reap.append(server)
    log = LineReader(server.stderr)
    with tls_connect(port, pki["ca"]) as conn:  # steady state: a spare waits, nothing pending
        conn.sendall(b"before")
        assert conn.recv(100) == b"before"
    while not END_LINE.search(log.readline()):
        pass
    workers = child_pids(server.pid)
    for pid in workers:  # the workers take the connections: none can take one more
        fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(fds) + 1)) - fds)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)  # in the backlog
    assert log.readline() == (
        "s6-tlsserver: warning: unable to accept: Too many open files, pausing accepts for 100 ms"
    )
    with pytest.raises(AssertionError, match="no line within"):
        log.readline(timeout=1)  # ten more tries in that second: not one more line
    assert server.poll() is None
    for pid in workers:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    with ctx.wrap_socket(waiting, server_hostname="localhost") as conn:
        conn.sendall(b"waited in the backlog")
        assert conn.recv(100) == b"waited in the backlog"
    for _ in range(5):
        with tls_connect(port, pki["ca"]) as conn:
            conn.sendall(b"and after")
            assert conn.recv(100) == b"and after"
    assert stop(server) == 0


def test_sighup_gives_new_connections_the_new_certificate_and_leaves_open_ones_alone(
    ca, tmp_path, reap
):
    old, new = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert, key, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    write_leaf(old, cert, key)
    env = {**os.environ, "CERTFILE": str(cert), "KEYFILE": str(key)}
    server, port = start_server(["-v"], ["cat"], env)
    reap.append(server)

    def fingerprint(conn: ssl.SSLSocket) -> str:
        return hashlib.sha256(conn.getpeercert(binary_form=True)).hexdigest()

    first = tls_connect(port, str(cafile))
    write_leaf(new, cert, key)
    server.send_signal(signal.SIGHUP)
    read_log_until(server, "reloaded the keypairs")
    second = tls_connect(port, str(cafile))
    der = ssl.PEM_cert_to_DER_cert(new.cert_chain_pems[0].bytes().decode())
    assert fingerprint(second) == hashlib.sha256(der).hexdigest()
    assert fingerprint(first) != fingerprint(second)
    first.sendall(b"old connection still works")
    assert first.recv(100) == b"old connection still works"
    first.close()
    second.close()
    stop(server)


def test_a_bad_keypair_on_sighup_keeps_the_old_one(server_env, pki, tmp_path, reap):
    cert = tmp_path / "cert.pem"
    cert.write_bytes(Path(server_env["CERTFILE"]).read_bytes())
    server, port = start_server(["-v"], ["cat"], {**server_env, "CERTFILE": str(cert)})
    reap.append(server)
    cert.write_text("not a certificate\n")
    server.send_signal(signal.SIGHUP)
    line = read_log_until(server, "unable to reload")[-1]
    assert line.startswith("s6-tlsserver: warning: unable to reload the keypairs")
    conn = tls_connect(port, pki["ca"])
    conn.sendall(b"ok")
    assert conn.recv(10) == b"ok"
    conn.close()
    stop(server)


def test_bad_address_and_missing_certfile_are_usage_errors(server_env):
    env = {k: v for k, v in server_env.items() if k != "CERTFILE"}
    for args, environ, message in (
        (["not-an-ip", "4433", "cat"], server_env, "not-an-ip is not an IP address"),
        (["-4", "::1", "4433", "cat"], server_env, "::1 is not an IPv4 address"),
        (["127.0.0.1", "4433", "cat"], env, "CERTFILE and KEYFILE must be set"),
        (["127.0.0.1", "4433"], server_env, "usage: s6-tlsserver [ -q | -Q | -v ] "),
    ):
        proc = subprocess.run(
            [*program("s6-tlsserver"), *args], env=environ, capture_output=True, timeout=30
        )
        assert proc.returncode == 100, (args, proc.stderr)
        err = proc.stderr.decode()
        kind = "usage" if message.startswith("usage:") else "fatal"
        assert err.startswith(f"s6-tlsserver: {kind}: ") and message.lower() in err.lower(), err
        assert err.count("\n") == 1


def test_client_reports_a_refused_connection_as_a_system_failure(pki):
    from server_helpers import free_port

    proc = subprocess.run(
        [*program("s6-tlsclient"), "127.0.0.1", str(free_port()), "true"],
        env={**os.environ, "CAFILE": pki["ca"]},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 111
    assert proc.stderr.decode().startswith("s6-tlsclient: fatal: unable to connect to 127.0.0.1")


def test_demo_exits_zero_and_shows_protocol_and_cipher():
    proc = subprocess.run([*program("s6tls"), "demo"], capture_output=True, timeout=60, check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, (out, proc.stderr)
    assert "SSL_PROTOCOL=TLSv1.3" in out and "SSL_CIPHER=TLS_" in out
    assert "server says: HELLO OVER TLS" in out
    # its last line gives a command that shows the manual from where it ran
    command = out.splitlines()[-1].split("read the manual: ", 1)[1]
    page = subprocess.run(
        shlex.split(command), env={**os.environ, "MANPAGER": "cat"}, capture_output=True, timeout=60
    )
    assert page.returncode == 0, page.stderr
    assert b"s6-tlsserver" in page.stdout

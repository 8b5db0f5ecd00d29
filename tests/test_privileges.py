"""Nothing a peer sends is parsed as root when ids are asked for; signals across forks.

With -u/-g (or TLS_UID/TLS_GID), the servers' workers take the ids as they
start, before they read a byte or a datagram: the cookie exchange and
``DTLSv1_listen`` of s6-dtlsserver, the PROXY header, banner, rules and
names of s6-tlsserver all run as those ids.  The supervisor keeps its own,
to read the keys again on SIGHUP.  What the connections will need after the
drop is checked at start as the ids they will have (TLS_SESSION_DIR).
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import program
from dtls_peer import DtlsClient
from server_helpers import child_pids, start_server, tls_connect

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")

NOBODY = "65534"


def ids_of(pid: int) -> tuple[list[str], list[str]]:
    """The real, effective, saved and filesystem uids and gids of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return uid, gid


@pytest.mark.parametrize("name", ["s6-tlsserver", "s6-dtlsserver"])
def test_the_workers_that_read_what_peers_send_run_as_the_ids_asked_for(
    name, server_env, pki, reap
):
    """One worker, which has served a connection (so it is past its start, where it
    takes the ids: a worker just forked is still root, and reads nothing yet)."""
    args = ["--workers", "1", "-u", NOBODY, "-g", NOBODY]
    args += ["-L", "-H"] if name == "s6-tlsserver" else []
    server, port = start_server(args, ["cat"], server_env, name=name)
    reap.append(server)
    if name == "s6-tlsserver":
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 443\r\n")
        ctx = ssl.create_default_context(cafile=pki["ca"])
        with ctx.wrap_socket(sock, server_hostname="localhost") as conn:
            conn.sendall(b"as nobody")
            assert conn.recv(100) == b"as nobody"
        # a PROXY header on its way: the worker holding it is the one above
        half = socket.create_connection(("127.0.0.1", port), timeout=30)
        half.sendall(b"PROXY TCP4 192.0.2.1 ")
    else:
        client = DtlsClient(port, pki["ca"])  # its cookie exchange, then DTLSv1_listen
        client.handshake()
        client.send(b"as nobody")
        assert client.recv() == b"as nobody"
        client.close_notify()
        client.close()
    workers = child_pids(server.pid)
    assert len(workers) == 1
    for worker in workers:
        assert ids_of(worker) == ([NOBODY] * 4, [NOBODY] * 4)
    assert ids_of(server.pid) == (["0"] * 4, ["0"] * 4)  # the supervisor: to read keys again
    server.terminate()
    server.communicate(timeout=30)


def test_a_session_directory_the_ids_cannot_write_is_refused_at_start(client_env, request):
    # Where nobody can reach it (pytest's own directories are root's only).
    sessions = Path(tempfile.mkdtemp(prefix="s6tls-sessions-"))
    request.addfinalizer(lambda: shutil.rmtree(sessions))
    sessions.chmod(0o755)  # root's: nobody cannot write there
    env = {**client_env, "TLS_SESSION_DIR": str(sessions), "TLS_UID": NOBODY, "TLS_GID": NOBODY}
    res = subprocess.run(
        [*program("s6-tlsclient"), "localhost", "1", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 96, res.stderr
    assert res.stderr == (
        f"s6-tlsclient: fatal: TLS_SESSION_DIR {sessions} is not a directory s6tls can write to\n"
    )
    os.chown(sessions, int(NOBODY), int(NOBODY))  # the twin: now nobody can
    res = subprocess.run(
        [*program("s6-tlsclient"), "-T", "1", "localhost", "1", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "TLS_SESSION_DIR" not in res.stderr
    assert res.returncode == 111  # past the checks: nothing listens on port 1


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-g", NOBODY], {}, "-g needs -u: "),
        ([], {"TLS_GID": NOBODY}, "TLS_GID needs TLS_UID: "),
    ],
)
def test_a_gid_without_a_uid_is_refused_at_start(args, env, message, server_env):
    res = subprocess.run(
        [*program("s6-tlsserver"), *args, "127.0.0.1", "0", "cat"],
        env={**server_env, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 100, res.stderr
    assert res.stderr.startswith(f"s6-tlsserver: fatal: {message}"), res.stderr


def test_a_sigterm_sent_while_workers_are_forked_is_never_lost(server_env, pki, reap):
    """SIGHUP forks new workers; SIGTERM right behind it still stops the server, every time."""
    for _ in range(10):
        server, port = start_server(["--workers", "2"], ["cat"], server_env)
        reap.append(server)
        with tls_connect(port, pki["ca"]) as conn:  # the workers are up and serving
            conn.sendall(b"up")
            assert conn.recv(10) == b"up"
        server.send_signal(signal.SIGHUP)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert child_pids(server.pid) == []

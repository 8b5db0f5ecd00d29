"""How a --ktls connection ends, inside the guest: the same as in userspace, and the rest.

The close matrix (-s/-S x -j/-J x who closes first x TLS 1.2/1.3: six
scenarios that pair every value with every other, all sixteen with
S6TLS_SLOW=1) runs each scenario twice, with and without --ktls, and asks
for the same outcome:
exit codes, what each application received, the errors reported.  The
kernel path changes how data moves, never how a connection ends.

Then what only the kernel path meets: a peer's KeyUpdate (Linux 6.1 cannot
change keys: 98 and one line), a fatal alert, a bare FIN, the TLS 1.3
session tickets (and a resumption), the fallbacks (a suite the kernel lacks,
a setsockopt the kernel refuses), and /proc/net/tls_stat.
"""

import itertools
import os
import re
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import program
from ktls_helpers import keys_of, one_connection, stop, wait_for, watched, watched_contexts
from OpenSSL import SSL
from server_helpers import END_LINE, start_server
from uml import build_preload

from s6tls.ktls import keys as ktls_keys
from s6tls.ktls import sockopts as ktls_socket
from s6tls.ktls.sockopts import FATAL, KernelTls

pytestmark = pytest.mark.guest

TIMEOUT = 60
# The closer waits for the other's first line: by then both ends took over (a
# connection the peer already half-closed cannot: then the data goes through
# userspace, which the path check below would refuse).
CLOSER = 'read ready <&{r}; printf "closer\\n" >&{w}; exec {w}>&-; cat <&{r} >"{out}"'
OTHER = 'printf "ready\\n" >&{w}; cat <&{r} >"{out}"; printf "reply\\n" >&{w}'
SERVER_FDS = {"r": 0, "w": 1}
CLIENT_FDS = {"r": 6, "w": 7}
VERSIONS = {"1.2": {"TLS_MAX_VERSION": "1.2"}, "1.3": {"TLS_MIN_VERSION": "1.3"}}


@pytest.fixture
def env(server_env):
    """Both ends' environment: the server's keypair, and the CA a client checks it with."""
    return server_env


def shell(script: str, fds: dict[str, int], out: Path) -> list[str]:
    return ["sh", "-c", script.format(out=out, **fds)]


def child_status(server_err: str) -> int:
    """The status s6-tlsserver reported for its one connection."""
    found = END_LINE.findall(server_err)
    assert len(found) == 1, server_err
    return int(found[0][3])


def fatal_lines(err: str) -> list[str]:
    """What went wrong, without pids, ports or the path."""
    lines = [ln for ln in err.splitlines() if ": fatal: " in ln or "warning: peer" in ln]
    return [re.sub(r"(pid|port|:)\s?\d+", r"\1 N", ln) for ln in lines]


def tunnel(env, tmp_path, args, server_app, client_app, ktls):
    """One connection of s6-tlsserver and s6-tlsclient, both with ``args``.

    Returns what both ends and both applications ended with; asserts that
    the data went the way asked (kernel or userspace) when it ended well.
    """
    mode = ["--ktls"] if ktls else []
    server_out, client_out = tmp_path / f"server{ktls}", tmp_path / f"client{ktls}"
    client, server_err = one_connection(
        ([*mode, *args], shell(server_app, SERVER_FDS, server_out)),
        ([*mode, *args], shell(client_app, CLIENT_FDS, client_out)),
        env,
    )
    client_err = client.stderr.decode(errors="replace")
    for err in (server_err, client_err):
        line = re.search(r" path (.*)$", err, re.MULTILINE)
        if line:  # the info line comes only after a tunnel ran
            assert line.group(1).startswith("kernel TLS" if ktls else "userspace"), err
    return {
        "client exit": client.returncode,
        "server child": child_status(server_err),
        "server app got": server_out.read_bytes() if server_out.exists() else None,
        "client app got": client_out.read_bytes() if client_out.exists() else None,
        "errors": fatal_lines(server_err) + fatal_lines(client_err),
    }


# Six scenarios cover every pair of values (pairwise); the other ten, slow.
PAIRWISE = {
    ("-s", "-j", "client", "1.3"),
    ("-S", "-J", "server", "1.3"),
    ("-S", "-j", "client", "1.2"),
    ("-s", "-J", "server", "1.2"),
    ("-S", "-j", "server", "1.3"),
    ("-s", "-J", "client", "1.2"),
}
MATRIX = [
    pytest.param(*case, marks=() if case in PAIRWISE else pytest.mark.slow)
    for case in itertools.product(["-s", "-S"], ["-j", "-J"], ["server", "client"], ["1.2", "1.3"])
]


@pytest.mark.parametrize(("notify", "strict", "closer", "version"), MATRIX)
def test_the_close_matrix_ends_as_in_userspace(env, tmp_path, version, closer, strict, notify):
    server_app, client_app = (CLOSER, OTHER) if closer == "server" else (OTHER, CLOSER)
    env = {**env, **VERSIONS[version]}
    args = [notify, strict]
    userspace = tunnel(env, tmp_path, args, server_app, client_app, ktls=False)
    kernel = tunnel(env, tmp_path, args, server_app, client_app, ktls=True)
    assert kernel == userspace


def test_an_application_exiting_with_data_in_flight(env, tmp_path):
    """What the application wrote before it died reaches the peer, then its status."""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20))
    dying = f'cat "{blob}" >&{{w}}; exit 3'
    reader = 'cat <&{r} >"{out}"'
    results = [tunnel(env, tmp_path, [], dying, reader, ktls=ktls) for ktls in (False, True)]
    assert results[0] == results[1]
    assert results[1]["server child"] == 3
    assert results[1]["client app got"] == blob.read_bytes()


# -- a peer in this process -----------------------------------------------------


class Peer:
    """A TLS 1.3 client in this process, on a socket to s6-tlsserver, that can go kernel."""

    def __init__(self, pki, port: int) -> None:
        _server_ctx, client_ctx = watched_contexts(pki, ktls_keys.TLS_1_3_VERSION, None)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setblocking(False)
        self.conn = watched(SSL.Connection(client_ctx, self.sock))
        self.conn.set_connect_state()
        self._wait_for(self.conn.do_handshake)

    def _wait_for(self, op, *args):
        """``op(*args)``, waiting (within TIMEOUT) while OpenSSL wants to read."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return op(*args)
            except SSL.WantReadError:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self.sock], [], [], left)[0], "peer stalled"

    def kernel(self) -> KernelTls:
        return KernelTls.install(self.sock.fileno(), keys_of(self.conn))

    def read_all(self) -> bytes:
        """What the server sends until it closes (close_notify or EOF)."""
        got = b""
        while True:
            try:
                chunk = self._wait_for(self.conn.recv, 65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                return got
            if not chunk:
                return got
            got += chunk


def test_a_fatal_alert_from_the_peer_is_98_with_its_name(env, pki, tmp_path, reap):
    server, port = start_server(["-v", "--ktls"], ["sh", "-c", f'cat >"{tmp_path}/got"'], env)
    reap.append(server)
    peer = Peer(pki, port)
    ktls = peer.kernel()  # OpenSSL must not have sent anything: the sequence starts at 0
    ktls.sock.sendall(b"before\n")
    ktls.send_alert(FATAL, 40)
    # Read to the server's end before closing: closing with its tickets unread
    # would send a RST, which may reach it before the alert, and a FIN that
    # came before its switch would keep it in userspace.
    buf = memoryview(bytearray(ktls_socket.MAX_RECORD))
    while True:
        wait_for(ktls.fd, select.POLLIN)
        if ktls.read_record(buf) == (0, 0):
            break
    ktls.close()
    err = stop(server)
    assert child_status(err) == 98
    assert "peer sent a fatal alert: handshake_failure" in err, err
    assert (tmp_path / "got").read_bytes() == b"before\n"


def test_a_tls12_renegotiation_is_refused_as_in_userspace(env, pki, tmp_path, reap):
    """The kernel hands over the renegotiating ClientHello; s6tls answers as OpenSSL does.

    A no_renegotiation warning; OpenSSL's client then gives up with a fatal
    handshake_failure alert, and the connection ends with 98.
    """
    server, port = start_server(["-v", "--ktls"], ["sh", "-c", f'cat >"{tmp_path}/got"'], env)
    reap.append(server)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(None)  # OpenSSL blocks; the server's end bounds every wait
    tls = SSL.Connection(ctx, sock)
    tls.set_connect_state()
    tls.do_handshake()
    tls.sendall(b"before\n")
    assert tls.renegotiate()
    with pytest.raises(SSL.Error, match="no renegotiation"):
        tls.do_handshake()
        tls.recv(100)  # the refusal may only show on the next read
    sock.settimeout(TIMEOUT)
    while sock.recv(65536):  # to the server's end: our close must not reset it first
        pass
    sock.close()
    err = stop(server)
    assert child_status(err) == 98, err
    # The kernel path's words (OpenSSL's own: "tls alert handshake failure").
    assert "peer sent a fatal alert: handshake_failure" in err, err
    assert (tmp_path / "got").read_bytes() == b"before\n"


def test_under_s_the_kernel_ends_tls13_with_close_notify_then_reads_on(env, pki, reap):
    """RFC 8446 6.1 on the kernel path too: the application's EOF is a close_notify."""
    app = ["sh", "-c", "echo bye; exec >&-; head -n 1 >/dev/null; exit 5"]
    server, port = start_server(["-v", "--ktls", "-s"], app, env)
    reap.append(server)
    peer = Peer(pki, port)
    assert peer.read_all() == b"bye\n"
    assert peer.conn.get_shutdown() & SSL.RECEIVED_SHUTDOWN  # not a bare FIN
    peer._wait_for(peer.conn.sendall, b"still read\n")  # our direction goes on
    peer._wait_for(peer.conn.shutdown)
    err = stop(server)
    assert child_status(err) == 5, err
    assert " path kernel TLS TLSv1.3 " in err, err


@pytest.mark.parametrize(("strict", "status"), [("-j", 0), ("-J", 98)])
def test_a_bare_fin(env, pki, tmp_path, reap, strict, status):
    server, port = start_server(
        ["-v", "--ktls", strict], ["sh", "-c", f'cat >"{tmp_path}/got"'], env
    )
    reap.append(server)
    peer = Peer(pki, port)
    peer.conn.sendall(b"all of it\n")
    peer.sock.shutdown(socket.SHUT_WR)
    assert peer.read_all() == b""
    err = stop(server)
    assert child_status(err) == status, err
    assert (tmp_path / "got").read_bytes() == b"all of it\n"
    if status:
        assert "peer closed the connection without close_notify" in err


def test_a_key_update_the_kernel_cannot_follow_ends_with_98(env, tmp_path, reap):
    """openssl s_client's "K" command: a KeyUpdate that asks for ours too."""
    got, fifo = tmp_path / "got", tmp_path / "fifo"
    os.mkfifo(fifo)
    app = f'head -n 1 >"{got}"; echo >"{fifo}"; cat >>"{got}"'  # says when it got the line
    server, port = start_server(["-v", "--ktls"], ["sh", "-c", app], {**env, **VERSIONS["1.3"]})
    reap.append(server)
    peer = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", env["CAFILE"]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    reap.append(peer)
    said = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO never written: no EOF yet
    try:
        peer.stdin.write(b"before\n")
        peer.stdin.flush()
        assert select.select([said], [], [], TIMEOUT)[0], "the application never got the line"
    finally:
        os.close(said)
    peer.stdin.write(b"K\n")
    peer.stdin.flush()
    peer.communicate(timeout=TIMEOUT)
    err = stop(server)
    assert child_status(err) == 98, err
    assert (
        "peer sent a KeyUpdate, and kernel TLS cannot change keys here: "
        "Device or resource busy" in err
    ), err
    assert (tmp_path / "got").read_bytes() == b"before\n"


def test_tls13_tickets_then_a_resumed_session(env, tmp_path, reap):
    """s6-tlsserver's tickets come before the data (their sequence numbers count),
    and a session resumed from one goes through the kernel too."""
    server, port = start_server(
        ["-v", "--ktls", "-S"], ["echo", "hello"], {**env, **VERSIONS["1.3"]}
    )
    reap.append(server)
    session = tmp_path / "session"
    outputs = []
    try:
        for extra in (["-sess_out", str(session)], ["-sess_in", str(session)]):
            peer = subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-ign_eof",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-CAfile",
                    env["CAFILE"],
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=TIMEOUT,
            )
            outputs.append(peer.stdout.decode(errors="replace"))
    finally:
        err = stop(server)
    assert all("\nhello\n" in out for out in outputs), (outputs, err)
    assert session.stat().st_size > 0
    assert "Reused, TLSv1.3" in outputs[1], outputs[1]
    assert err.count("path kernel TLS TLSv1.3") == 2, err


# -- fallbacks ----------------------------------------------------------------------


def fallback(env, tmp_path, server_env=None):
    """One connection, both ends --ktls, the closer on the server side; (client, server stderr).

    The data must have gone through in both directions.
    """
    client, err = one_connection(
        (["--ktls"], shell(CLOSER, SERVER_FDS, tmp_path / "s")),
        (["--ktls"], shell(OTHER, CLIENT_FDS, tmp_path / "c")),
        env,
        server_env,
    )
    assert client.returncode == 0, (client.stderr, err)
    assert (tmp_path / "c").read_text() == "closer\n"
    assert (tmp_path / "s").read_text() == "reply\n"
    return client.stderr.decode(), err


def test_a_suite_the_kernel_lacks_goes_on_in_userspace(env, tmp_path):
    env = {**env, **VERSIONS["1.3"], "TLS_CIPHERSUITES": "TLS_AES_128_CCM_SHA256"}
    why = "TLSv1.3 TLS_AES_128_CCM_SHA256 is not a suite kernel TLS takes"
    for err in fallback(env, tmp_path):
        assert f"status 0 path userspace (kernel TLS: {why})" in err, err


@pytest.fixture(scope="module")
def fail_setsockopt(tmp_path_factory):
    out = tmp_path_factory.mktemp("preload") / "fail_setsockopt.so"
    build_preload(Path(__file__).parent / "fail_setsockopt.c", out)
    return str(out)


@pytest.mark.parametrize(
    ("which", "why"),
    [
        ("ulp", "unable to attach the tls module: Cannot allocate memory"),
        ("tx", "the kernel refused the send key: Cannot allocate memory"),
    ],
)
def test_a_refused_setsockopt_goes_on_in_userspace(env, tmp_path, fail_setsockopt, which, why):
    env = {**env, "LD_PRELOAD": fail_setsockopt, "S6TLS_FAIL": which}
    for err in fallback(env, tmp_path):
        assert f"status 0 path userspace (kernel TLS: {why})" in err, err


def test_a_receive_key_refused_after_the_send_key_is_98_never_half_applied(
    env, tmp_path, fail_setsockopt
):
    client, err = one_connection(
        (["--ktls"], ["echo", "never sent"]),
        ([], shell('cat <&{r} >"{out}"', CLIENT_FDS, tmp_path / "c")),
        env,
        {**env, "LD_PRELOAD": fail_setsockopt, "S6TLS_FAIL": "rx"},
    )
    assert child_status(err) == 98, err
    assert "kernel TLS took the send key but refused the receive key: Cannot allocate memory" in err
    assert (tmp_path / "c").read_bytes() == b""  # nothing went out, in neither path
    assert client.returncode == 0  # a bare end: the peer sees EOF (-j)


def test_tls_stat_counts_the_connections_the_kernel_runs(env, tmp_path, reap):
    def stat():
        return dict(
            (name, int(value))
            for name, value in (
                ln.split() for ln in Path("/proc/net/tls_stat").read_text().splitlines()
            )
        )

    before = stat()
    server, port = start_server(["--ktls"], ["cat"], env)
    reap.append(server)
    client = subprocess.Popen(
        [
            *program("s6-tlsclient"),
            "--ktls",
            "127.0.0.1",
            str(port),
            "sh",
            "-c",
            "echo up >&7; cat <&6",
        ],
        env=env,
        stdout=subprocess.PIPE,
    )
    reap.append(client)
    assert client.stdout.readline() == b"up\n"
    during = stat()
    client.terminate()
    client.wait(timeout=TIMEOUT)
    stop(server)
    after = stat()
    for name in ("TlsCurrTxSw", "TlsCurrRxSw"):
        assert during[name] - before[name] == 2
        assert after[name] == before[name]
    for name in ("TlsTxSw", "TlsRxSw"):
        assert after[name] - before[name] == 2

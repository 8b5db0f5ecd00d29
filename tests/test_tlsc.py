"""s6-tlsc as a real process, under ucspi-tcp's tcpclient or on a connected socket.

Its peers are real: openssl s_server, s6-tlsd under tcpserver, and raw sockets
that misbehave on purpose.  Every failure checks the exit code and the one
line on stderr; every success checks the data.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

import pytest
from ucspi_helpers import (
    CLIENT_PRINT_ENV,
    PY,
    SERVER_PRINT_ENV,
    LineReader,
    TcpServer,
    direct_pair,
    exchange_environments,
    fatal,
    finish,
    openssl_sha256,
    openssl_subject,
    spawn_tlsc,
    tcp_pair,
    tcpclient,
    touch_then,
)

SECRETS = ("CADIR", "CAFILE", "CERTFILE", "KEYFILE", "TLS_UID", "TLS_GID")

# Sends one line on fd 7, prints the first line that comes back on fd 6, then
# what it knows of the connection.
ONE_LINE = [
    *PY,
    "import os\n"
    "os.write(7, b'hello world\\n')\n"
    "reply = b''\n"
    "while not reply.endswith(b'\\n') and (chunk := os.read(6, 4096)): reply += chunk\n"
    "print(reply.decode().strip())\n"
    "print(os.environ['SSL_PROTOCOL'], os.environ['SSL_CIPHER'])",
]


class SServer:
    """``openssl s_server`` for one connection on a free loopback port, ready to accept."""

    def __init__(self, pki: dict[str, str], *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                "openssl",
                "s_server",
                "-accept",
                "127.0.0.1:0",
                "-cert",
                pki["server_cert"],
                "-key",
                pki["server_key"],
                "-naccept",
                "1",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.out = LineReader(self.proc.stdout)
        while not (m := re.fullmatch(r"ACCEPT 127\.0\.0\.1:(\d+)", self.out.readline(20))):
            pass
        self.port = int(m.group(1))

    def log(self) -> str:
        """Everything s_server printed after ACCEPT, once it exited."""
        self.proc.wait(timeout=20)
        rest = []
        while line := self.out.readline(20):
            rest.append(line)
        return "\n".join(rest)

    def __enter__(self) -> "SServer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


# --- round trips with real peers ---------------------------------------------------------


def test_round_trip_with_openssl_s_server_under_tcpclient(pki, client_env):
    # -S with OpenSSL peers: an OpenSSL 3 peer takes a bare EOF (-s) for an
    # error and answers it with a decode_error alert.
    with SServer(pki, "-rev") as server:
        res = tcpclient(server.port, ["-S", "-k", "localhost"], ONE_LINE, client_env)
        log = server.log()
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""
    reply, facts = res.stdout.decode().splitlines()
    assert reply == "dlrow olleh"
    assert facts == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert "Protocol version: TLSv1.3" in log
    assert "Ciphersuite: TLS_AES_256_GCM_SHA384" in log


def test_tls_1_2_server_gives_its_protocol_and_cipher_to_the_application(pki, client_env):
    with SServer(pki, "-rev", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256") as server:
        res = tcpclient(server.port, ["-S", "-k", "localhost"], ONE_LINE, client_env)
        log = server.log()
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == [
        "dlrow olleh",
        "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256",
    ]
    assert "Ciphersuite: ECDHE-ECDSA-AES128-GCM-SHA256" in log


def test_y_presents_the_client_certificate_an_openssl_server_requires(pki, client_env):
    with SServer(pki, "-rev", "-Verify", "1", "-CAfile", pki["ca"]) as server:
        res = tcpclient(server.port, ["-S", "-y", "-k", "localhost"], ONE_LINE, client_env)
        log = server.log()
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines()[0] == "dlrow olleh"
    assert re.search(r"^Peer certificate: .*, CN = client\.example$", log, re.M), log
    assert "Verification: OK" in log


def test_trust_anchors_from_a_hashed_cadir(pki, client_env, server_env, tmp_path):
    cadir = tmp_path / "certs"
    cadir.mkdir()
    shutil.copy(pki["ca"], cadir / "ca.pem")
    subprocess.run(["openssl", "rehash", str(cadir)], check=True, timeout=10)
    env = {**client_env, "CADIR": str(cadir)}
    del env["CAFILE"]
    with TcpServer([], ["sh", "-c", "echo via-cadir"], server_env) as srv:
        res = tcpclient(srv.port, ["-k", "localhost"], ["sh", "-c", "exec cat <&6"], env)
        assert srv.wait_end() == (0, [])
    assert (res.returncode, res.stdout, res.stderr) == (0, b"via-cadir\n", b"")


# --- the application's environment and descriptors ----------------------------------------


def test_application_sees_the_server_certificate_and_no_secret_variables(
    server_env, client_env, pki
):
    env = {
        **client_env,
        "TLS_UID": "0",
        "TLS_GID": "0",
        "SSL_PEER_CERT_HASH": "SHA256:stale",
        "SSL_TLS_SNI_SERVERNAME": "stale.example",
    }
    with TcpServer([], SERVER_PRINT_ENV, server_env) as srv:
        client_seen, server_seen = exchange_environments(srv.port, ["-k", "localhost"], env)
        assert srv.wait_end() == (0, [])
    assert client_seen["SSL_PROTOCOL"] == "TLSv1.3"
    assert client_seen["SSL_CIPHER"] == server_seen["SSL_CIPHER"] == "TLS_AES_256_GCM_SHA384"
    assert client_seen["SSL_TLS_SNI_SERVERNAME"] == "localhost"
    assert client_seen["SSL_PEER_CERT_HASH"] == openssl_sha256(pki["server_cert"])
    assert client_seen["SSL_PEER_CERT_SUBJECT"] == openssl_subject(pki["server_cert"])
    assert [k for k in client_seen if k in SECRETS] == []
    assert client_seen["TCPREMOTEPORT"] == str(srv.port)  # tcpclient's variables pass through


def test_Z_keeps_the_key_and_ca_variables(server_env, client_env, tmp_path):
    env = {**client_env, "CADIR": str(tmp_path), "TLS_UID": "0", "TLS_GID": "0"}
    with TcpServer([], SERVER_PRINT_ENV, server_env) as srv:
        client_seen, _ = exchange_environments(srv.port, ["-Z", "-k", "localhost"], env)
        assert srv.wait_end() == (0, [])
    for name in SECRETS:
        assert client_seen[name] == env[name]


def test_y_sends_the_client_certificate_and_Y_does_not(server_env, client_env, pki):
    with TcpServer(["-Y"], SERVER_PRINT_ENV, server_env) as srv:
        _, with_cert = exchange_environments(srv.port, ["-y", "-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [])
        _, without = exchange_environments(srv.port, ["-y", "-Y", "-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [])
    assert with_cert["SSL_PEER_CERT_HASH"] == openssl_sha256(pki["client_cert"])
    assert with_cert["SSL_PEER_CERT_SUBJECT"] == openssl_subject(pki["client_cert"])
    assert "SSL_PEER_CERT_HASH" not in without
    assert "SSL_PEER_CERT_SUBJECT" not in without


FDS_REPORT = [
    *PY,
    "import os, stat, sys\n"
    "def kind(fd):\n"
    "    try: m = os.fstat(fd).st_mode\n"
    "    except OSError: return 'closed'\n"
    "    return 'pipe' if stat.S_ISFIFO(m) else 'socket' if stat.S_ISSOCK(m) else 'other'\n"
    "kinds = [kind(fd) for fd in (6, 7, 8, 9)]\n"
    "r, w = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.write(w, b'ping\\n'); os.close(w)\n"
    "reply = b''\n"
    "while chunk := os.read(r, 4096): reply += chunk\n"
    "print(reply.decode().strip(), *kinds)",
]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "ping pipe pipe closed closed"),
        (["-6", "8", "-7", "9"], "ping closed closed pipe pipe"),
    ],
)
def test_application_gets_pipes_on_its_fds_never_the_socket(args, expected, server_env, client_env):
    fds = [a for a in args if a.isdigit()] or ["6", "7"]
    with TcpServer([], ["cat"], server_env) as srv:
        res = tcpclient(srv.port, [*args, "-k", "localhost"], [*FDS_REPORT, *fds], client_env)
        assert srv.wait_end() == (0, [])
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().strip() == expected


def test_no_verify_cert_needs_no_ca_and_says_so_unless_quiet(server_env, client_env, pki):
    env = {k: v for k, v in client_env.items() if k != "CAFILE"}
    with TcpServer([], SERVER_PRINT_ENV, server_env) as srv:
        res = tcpclient(srv.port, ["--no-verify-cert"], CLIENT_PRINT_ENV, env)
        assert srv.wait_end() == (0, [])
        quiet = tcpclient(srv.port, ["--no-verify-cert", "-v", "0"], ["true"], env)
        assert srv.wait_end() == (0, [])
    assert res.returncode == 0
    assert res.stderr.decode() == (
        "s6-tlsc: warning: not verifying the server's certificate (--no-verify-cert)\n"
    )
    client_seen, _ = eval(res.stdout)
    assert client_seen["SSL_PEER_CERT_HASH"] == openssl_sha256(pki["server_cert"])
    assert "SSL_TLS_SNI_SERVERNAME" not in client_seen  # no -k: no SNI
    assert (quiet.returncode, quiet.stderr) == (0, b"")


def test_without_k_the_chain_is_checked_and_a_warning_says_the_name_is_not(
    server_env, client_env, pki, tmp_path
):
    with TcpServer([], ["true"], server_env) as srv:
        res = tcpclient(srv.port, [], ["true"], client_env)
        assert srv.wait_end() == (0, [])
        env = {**client_env, "CAFILE": pki["other_ca"]}
        refused = tcpclient(srv.port, [], ["true"], env)
        assert srv.wait_end()[0] == 97
    warning = "s6-tlsc: warning: the server's name is not checked, only its chain: use -k NAME"
    assert res.returncode == 0
    assert res.stderr.decode().startswith(warning) and res.stderr.count(b"\n") == 1
    assert refused.returncode == 97
    assert b"unable to get local issuer certificate" in refused.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_tls_uid_and_gid_apply_to_the_engine_and_the_application(server_env, client_env):
    who = [
        "sh",
        "-c",
        'echo "app $(id -u) $(id -g) $(id -G)"; grep -E "^(Uid|Gid):" /proc/$PPID/status;'
        ' tr "\\0" " " </proc/$PPID/cmdline; echo; exec cat <&6',
    ]
    env = {**client_env, "TLS_UID": "65534", "TLS_GID": "65534"}
    with TcpServer([], ["sh", "-c", "echo from-server"], server_env) as srv:
        res = tcpclient(srv.port, ["-k", "localhost"], who, env)
        assert srv.wait_end() == (0, [])
    assert res.returncode == 0, res.stderr
    app, uid, gid, engine, data = res.stdout.decode().splitlines()
    assert app == "app 65534 65534 65534"
    assert uid.split() == ["Uid:", "65534", "65534", "65534", "65534"]
    assert gid.split() == ["Gid:", "65534", "65534", "65534", "65534"]
    assert "s6-tlsc" in engine  # prog's parent is the engine itself
    assert data == "from-server"


# --- failures: exit code and one line ---------------------------------------------------


def test_server_name_mismatch_exits_97_and_the_server_application_never_starts(
    server_env, client_env, tmp_path
):
    marker = tmp_path / "server-app-started"
    server, client = direct_pair(
        ([], touch_then(marker, "cat"), server_env),
        (["-k", "wrong.example"], ["true"], client_env),
    )
    assert client[0] == 97
    assert fatal(client[2], "s6-tlsc") == (
        "certificate does not match the server name wrong.example (certificate verify failed)"
    )
    # the check runs inside the handshake: the client sends an alert, never Finished
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd") == "tls alert bad certificate"
    assert not marker.exists()

    server, client = direct_pair(
        ([], touch_then(marker, "cat"), server_env), (["-k", "localhost"], ["true"], client_env)
    )
    assert (server, client) == ((0, b"", ""), (0, b"", ""))
    assert marker.exists()  # the same set-up with the right name does start it


def test_server_from_an_untrusted_ca_exits_97(server_env, client_env, pki, tmp_path):
    marker = tmp_path / "server-app-started"
    server, client = direct_pair(
        ([], touch_then(marker, "cat"), server_env),
        (["-k", "localhost"], ["true"], {**client_env, "CAFILE": pki["other_ca"]}),
    )
    assert client[0] == 97
    assert fatal(client[2], "s6-tlsc") == (  # no "(certificate verify failed)" again
        "certificate verify failed at depth 0: unable to get local issuer certificate"
    )
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd") == "tlsv1 alert unknown ca"
    assert not marker.exists()


def run_against_raw_server(
    args: Sequence[str], env: dict[str, str], tmp_path, answer: bytes | None
) -> tuple[int, str, bool]:
    """s6-tlsc against a server that reads the ClientHello, then sends ``answer`` and EOF.

    With ``answer`` None the server stays silent.  Returns the exit code,
    stderr and whether the application started.
    """
    marker = tmp_path / "app-started"
    s, c = tcp_pair()
    with s:
        tlsc = spawn_tlsc(args, touch_then(marker, "true"), env, c)
        s.settimeout(10)
        assert s.recv(5)[0] == 0x16  # a handshake record: the ClientHello
        if answer is not None:
            s.sendall(answer)
            s.shutdown(socket.SHUT_WR)
        code, _, err = finish(tlsc)
    return code, err, marker.exists()


def test_garbage_from_the_server_exits_97(client_env, tmp_path):
    code, err, started = run_against_raw_server(
        ["-k", "localhost"], client_env, tmp_path, b"SSH-2.0-OpenSSH_9.2\r\n"
    )
    assert (code, started) == (97, False)
    assert fatal(err, "s6-tlsc") == "wrong version number"


def test_server_closing_in_the_middle_of_the_handshake_exits_97(client_env, tmp_path):
    code, err, started = run_against_raw_server(["-k", "localhost"], client_env, tmp_path, b"")
    assert (code, started) == (97, False)
    assert fatal(err, "s6-tlsc") == "peer closed the connection during the handshake"


def test_silent_server_times_out_with_K_and_exits_98(client_env, tmp_path):
    start = time.monotonic()
    code, err, started = run_against_raw_server(
        ["-K", "300", "-k", "localhost"], client_env, tmp_path, None
    )
    assert (code, started) == (98, False)
    assert fatal(err, "s6-tlsc") == "handshake timed out"
    assert 0.3 <= time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("args", "change", "code", "message"),
    [
        ([], {"CAFILE": None}, 100, "CAFILE or CADIR must be set (or use --no-verify-cert)"),
        (
            [],
            {"CAFILE": "/nonexistent/ca.pem"},
            96,
            "unable to read CAFILE /nonexistent/ca.pem: No such file or directory",
        ),
        (
            [],
            {"CAFILE": "@garbage"},
            96,
            "CAFILE @garbage is neither PEM nor DER: give a certificate file",
        ),
        (
            [],
            {"CAFILE": None, "CADIR": "/nonexistent"},
            96,
            "unable to read CADIR /nonexistent: not a readable directory",
        ),
        (["-y"], {"CERTFILE": None, "KEYFILE": None}, 100, "-y needs CERTFILE and KEYFILE"),
        (["-y"], {"KEYFILE": None}, 100, "CERTFILE and KEYFILE must be set together"),
        (
            ["-y"],
            {"KEYFILE": "/nonexistent/key.pem"},
            96,
            "unable to read KEYFILE /nonexistent/key.pem: No such file or directory",
        ),
        ([], {"TLS_UID": "nobody"}, 100, "invalid TLS_UID: 'nobody' is not a numeric id"),
        ([], {"TLS_GID": "1.5"}, 100, "invalid TLS_GID: '1.5' is not a numeric id"),
        (["-6", "7", "-7", "7"], {}, 100, "-6 and -7 must be different descriptors, 3 or more"),
        (["-6", "2"], {}, 100, "-6 and -7 must be different descriptors, 3 or more"),
        (["-k", ""], {}, 100, "-k needs a server name"),
        (["-k", "a..b"], {}, 100, "invalid server name 'a..b': not a valid host name"),
        (["-k", "a" * 64 + ".example"], {}, 100, "invalid server name 'aaaa"),
        (["-k", "xn--zz.example"], {}, 100, "invalid server name 'xn--zz.example': not a valid"),
        (["-X"], {}, 100, "unrecognized option: -X (see s6-tlsc --help)"),
        (["-K", "-1"], {}, 100, "-K must be an unsigned integer, not '-1'"),
    ],
)
def test_bad_configuration_exits_before_the_handshake(
    args, change, code, message, client_env, tmp_path
):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    env = dict(client_env)
    for name, value in change.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(garbage) if value == "@garbage" else value
    s, c = tcp_pair()
    with s:
        tlsc = spawn_tlsc(["-k", "localhost", *args], ["true"], env, c)
        got, _, err = finish(tlsc)
        s.settimeout(10)
        assert s.recv(1) == b""  # nothing was sent: not even a ClientHello
    assert got == code
    assert fatal(err, "s6-tlsc").startswith(message.replace("@garbage", str(garbage)))


def test_missing_network_fds_exit_111(client_env):
    tlsc = spawn_tlsc(["-k", "localhost"], ["true"], client_env, None)
    code, _, err = finish(tlsc)
    assert code == 111
    assert fatal(err, "s6-tlsc") == "unable to check network fds: descriptor 6: Bad file descriptor"

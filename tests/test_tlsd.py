"""s6-tlsd as a real process, under ucspi-tcp's tcpserver or on an accepted socket.

Its peers are real: s6-tlsc under tcpclient, openssl s_client (piped and
interactive through pexpect), gnutls-cli and curl.  Every failure checks the
exit code and the one line on stderr; every success checks the data.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

import pexpect
import pytest
import trustme
from conftest import program, write_leaf
from OpenSSL import SSL
from server_helpers import APPS
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
    spawn_tlsd,
    tcp_pair,
    tcpclient,
    touch_then,
)

SECRETS = ("CADIR", "CAFILE", "CERTFILE", "KEYFILE", "TLS_UID", "TLS_GID")

# Reads one line, answers with the protocol and the line, exits.
ONE_LINE = ["sh", "-c", 'read -r line; printf "%s %s %s\\n" "$SSL_PROTOCOL" "$SSL_CIPHER" "$line"']

# Answers every line in upper case, at once; "quit" ends it.
UPPER = [
    *PY,
    "import sys\n"
    "while (line := sys.stdin.readline()) and line.strip() != 'quit':\n"
    "    sys.stdout.write(line.upper()); sys.stdout.flush()",
]

# A minimal HTTP/1.0 server: reads the request head, answers with TLS facts and the path.
HTTP_APP = [
    *PY,
    "import os\n"
    "req = b''\n"
    "while b'\\r\\n\\r\\n' not in req and (chunk := os.read(0, 4096)): req += chunk\n"
    "path = req.split(b' ')[1].decode()\n"
    "env = os.environ\n"
    "body = f\"{env['SSL_PROTOCOL']} {env.get('SSL_TLS_SNI_SERVERNAME')} {path}\\n\"\n"
    "os.write(1, b'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n' + body.encode())",
]


@pytest.fixture(scope="session")
def sni_pki(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> dict[str, tuple[str, str]]:
    """Keypairs for the SNI names a.example and *.wild.example, from the trusted CA."""
    d = tmp_path_factory.mktemp("sni")
    out = {}
    for name in ("a.example", "*.wild.example"):
        leaf = ca.issue_cert(name)
        stem = name.replace("*", "star")
        cert, key = d / f"{stem}.pem", d / f"{stem}.key"
        write_leaf(leaf, cert, key)
        out[name] = (str(cert), str(key))
    return out


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory, other_ca: trustme.CA) -> dict[str, str]:
    """A client keypair issued by the CA nobody trusts."""
    d = tmp_path_factory.mktemp("stranger")
    leaf = other_ca.issue_cert("stranger.example", common_name="stranger.example")
    write_leaf(leaf, d / "cert.pem", d / "key.pem")
    return {"CERTFILE": str(d / "cert.pem"), "KEYFILE": str(d / "key.pem")}


def s_client(port: int, cafile: str, *extra: str) -> list[str]:
    return [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-CAfile",
        cafile,
        "-verify_return_error",
        "-verify_hostname",
        "localhost",
        "-servername",
        "localhost",
        *extra,
    ]


def s_client_line(argv: list[str], line: bytes) -> tuple[bytes, int, str]:
    """Send one line through ``openssl s_client``; return its first line, exit code, stderr.

    s_client's stdin stays open until the answer is in: at stdin's EOF it
    would close the connection before the answer arrives.
    """
    client = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert client.stdin is not None and client.stdout is not None
    with client:
        client.stdin.write(line)
        client.stdin.flush()
        answer = LineReader(client.stdout).readline(timeout=20) + "\n"
        _, err = client.communicate(timeout=20)  # closes stdin
    return answer.encode(), client.returncode, err.decode()


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello, from an OpenSSL client on memory BIOs."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


# --- round trips with real peers ---------------------------------------------------------


def test_a_mebibyte_round_trips_under_tcpserver_to_s6_tlsc_under_tcpclient(server_env, client_env):
    with TcpServer([], ["cat"], server_env) as srv:
        echo = [sys.executable, str(APPS / "echo_check.py"), str(1 << 20)]
        res = tcpclient(srv.port, ["-k", "localhost"], echo, client_env)
        assert res.returncode == 0, res.stderr
        sent, got = res.stderr.split()[2], res.stderr.split()[5]
        assert sent == got
        assert srv.wait_end() == (0, [])


def test_openssl_s_client_gets_the_answer_and_a_clean_end_with_S(server_env, pki):
    with TcpServer(["-S"], ONE_LINE, server_env) as srv:
        argv = s_client(srv.port, pki["ca"], "-quiet")
        answer, code, err = s_client_line(argv, b"hello from s_client\n")
        assert answer == b"TLSv1.3 TLS_AES_256_GCM_SHA384 hello from s_client\n"
        assert code == 0, err
        assert srv.wait_end() == (0, [])


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_without_S_an_openssl_3_peer_gets_close_notify_under_tls13_a_bare_eof_under_tls12(
    version, server_env, pki
):
    with TcpServer([], ONE_LINE, server_env) as srv:
        argv = s_client(srv.port, pki["ca"], "-quiet", version)
        answer, code, err = s_client_line(argv, b"hello again\n")
        assert answer.startswith(b"TLSv1.") and answer.endswith(b" hello again\n")
        if version == "-tls1_3":  # RFC 8446 6.1: close_notify, then the half-close
            assert (code, "unexpected eof" in err) == (0, False), err
        else:  # -s keeps s6's meaning under TLS 1.2, and OpenSSL 3 calls it an error
            assert code == 1
            assert "unexpected eof while reading" in err
        # s_client's decode_error alert, if any, comes after the application
        # (which exited 0) sent everything: no error.
        assert srv.wait_end() == (0, [])


def test_openssl_s_client_over_tls_1_2_sees_its_protocol_and_cipher_in_the_application(
    server_env, pki
):
    tls12 = ("-quiet", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    with TcpServer(["-S"], ONE_LINE, server_env) as srv:
        answer, code, err = s_client_line(s_client(srv.port, pki["ca"], *tls12), b"twelve\n")
        assert code == 0, err
        assert answer == b"TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256 twelve\n"
        assert srv.wait_end() == (0, [])


def test_interactive_openssl_s_client_talks_line_by_line(server_env, pki):
    with TcpServer(["-S"], UPPER, server_env) as srv:
        child = pexpect.spawn(
            "openssl", s_client(srv.port, pki["ca"], "-quiet")[1:], timeout=20, encoding="utf-8"
        )
        try:
            child.expect("verify return:1\r\n.*verify return:1\r\n")
            for word in ("first", "second line", "third"):
                child.sendline(word)
                child.expect_exact(word.upper() + "\r\n")
            child.sendline("quit")  # the application exits: s6-tlsd closes, s_client ends
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert srv.wait_end() == (0, [])


def test_gnutls_cli_round_trip_and_its_rejection_of_an_unknown_ca(server_env, pki):
    with TcpServer([], ["sh", "-c", 'echo "sni=$SSL_TLS_SNI_SERVERNAME"; cat'], server_env) as srv:
        good = subprocess.run(
            ["gnutls-cli", "--x509cafile", pki["ca"], "-p", str(srv.port), "localhost"],
            input=b"through gnutls\n",
            capture_output=True,
            timeout=30,
        )
        assert good.returncode == 0, good.stderr
        tail = good.stdout.split(b"- Simple Client Mode:\n", 1)[1].splitlines()
        assert tail[-3:-1] == [b"sni=localhost", b"through gnutls"]
        assert srv.wait_end() == (0, [])

        bad = subprocess.run(
            ["gnutls-cli", "--x509cafile", pki["other_ca"], "-p", str(srv.port), "localhost"],
            input=b"never sent\n",
            capture_output=True,
            timeout=30,
        )
        assert bad.returncode == 1
        code, lines = srv.wait_end()
        assert code == 97
        assert fatal(lines, "s6-tlsd") == "tls alert bad certificate"


def test_curl_fetches_a_page_from_an_http_application_and_rejects_an_unknown_ca(server_env, pki):
    with TcpServer([], HTTP_APP, server_env) as srv:
        url = f"https://localhost:{srv.port}/hello"
        good = subprocess.run(
            ["curl", "-sS", "--cacert", pki["ca"], url], capture_output=True, timeout=30
        )
        assert good.returncode == 0, good.stderr
        assert good.stdout == b"TLSv1.3 localhost /hello\n"
        assert srv.wait_end() == (0, [])

        bad = subprocess.run(
            ["curl", "-sS", "--cacert", pki["other_ca"], url], capture_output=True, timeout=30
        )
        assert bad.returncode == 60  # peer certificate cannot be authenticated
        code, lines = srv.wait_end()
        assert code == 97
        assert fatal(lines, "s6-tlsd") == "tlsv1 alert unknown ca"


# --- the application's environment -------------------------------------------------------


IGNORED_SNI_KEYPAIRS = (
    "s6-tlsd: warning: the CERTFILE:name keypairs are ignored without -k 1 or -k 2"
)
NO_VERIFY = "s6-tlsc: warning: not verifying the server's certificate (--no-verify-cert)\n"


def secret_env(server_env, pki, tmp_path) -> dict[str, str]:
    """A server environment with every variable -z scrubs set (TLS_UID 0: no drop)."""
    return {
        **server_env,
        "CADIR": str(tmp_path),
        "TLS_UID": "0",
        "TLS_GID": "0",
        "CERTFILE:a.example": pki["server_cert"],
        "KEYFILE:a.example": pki["server_key"],
    }


def test_application_gets_tls_facts_and_no_secret_variables_by_default(
    server_env, client_env, pki, tmp_path
):
    env = {
        **secret_env(server_env, pki, tmp_path),
        "SSL_PEER_CERT_HASH": "SHA256:stale",
        "SSL_PEER_CERT_SUBJECT": "/CN=stale",
        "S6TLS_TEST_UNRELATED": "kept",
    }
    with TcpServer([], SERVER_PRINT_ENV, env) as srv:
        client_seen, server_seen = exchange_environments(srv.port, ["-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [IGNORED_SNI_KEYPAIRS])
    assert server_seen["SSL_PROTOCOL"] == "TLSv1.3"
    assert server_seen["SSL_CIPHER"] == client_seen["SSL_CIPHER"] == "TLS_AES_256_GCM_SHA384"
    assert server_seen["SSL_TLS_SNI_SERVERNAME"] == "localhost"
    assert "SSL_PEER_CERT_HASH" not in server_seen
    assert "SSL_PEER_CERT_SUBJECT" not in server_seen
    leaked = [k for k in server_seen if k in SECRETS or k.startswith(("CERTFILE:", "KEYFILE:"))]
    assert leaked == []
    assert server_seen["S6TLS_TEST_UNRELATED"] == "kept"
    assert server_seen["TCPREMOTEIP"] == "127.0.0.1"  # tcpserver's variables pass through


def test_Z_keeps_every_key_and_ca_variable(server_env, client_env, pki, tmp_path):
    env = secret_env(server_env, pki, tmp_path)
    with TcpServer(["-Z", "-k", "1"], SERVER_PRINT_ENV, env) as srv:
        _, server_seen = exchange_environments(srv.port, ["-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [])
    for name in (*SECRETS, "CERTFILE:a.example", "KEYFILE:a.example"):
        assert server_seen[name] == env[name]


def test_client_certificate_under_Y_gives_its_hash_and_subject(server_env, client_env, pki):
    with TcpServer(["-Y"], SERVER_PRINT_ENV, server_env) as srv:
        _, server_seen = exchange_environments(srv.port, ["-y", "-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [])
    assert server_seen["SSL_PEER_CERT_HASH"] == openssl_sha256(pki["client_cert"])
    assert server_seen["SSL_PEER_CERT_SUBJECT"] == openssl_subject(pki["client_cert"])
    assert server_seen["SSL_PEER_CERT_SUBJECT"].endswith("/CN=client.example")


def test_Y_lets_a_client_without_certificate_in_with_no_peer_variables(server_env, client_env):
    with TcpServer(["-Y"], SERVER_PRINT_ENV, server_env) as srv:
        _, server_seen = exchange_environments(srv.port, ["-k", "localhost"], client_env)
        assert srv.wait_end() == (0, [])
    assert "SSL_PEER_CERT_HASH" not in server_seen
    assert "SSL_PEER_CERT_SUBJECT" not in server_seen


def test_client_sending_no_server_name_leaves_the_sni_variable_unset(server_env, client_env):
    env = {**server_env, "SSL_TLS_SNI_SERVERNAME": "stale.example"}
    with TcpServer([], SERVER_PRINT_ENV, env) as srv:
        # an IP literal: verified against the certificate's IP address, never sent as SNI
        client_seen, server_seen = exchange_environments(srv.port, ["-k", "127.0.0.1"], client_env)
        assert srv.wait_end() == (0, [])
    assert "SSL_TLS_SNI_SERVERNAME" not in server_seen
    assert server_seen["SSL_PROTOCOL"] == "TLSv1.3"
    assert "SSL_TLS_SNI_SERVERNAME" not in client_seen


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_tls_uid_and_gid_apply_to_the_engine_and_the_application(server_env, client_env):
    who = [
        "sh",
        "-c",
        'echo "app $(id -u) $(id -g) $(id -G)"; grep -E "^(Uid|Gid):" /proc/$PPID/status;'
        ' tr "\\0" " " </proc/$PPID/cmdline; echo; echo "uidvar=${TLS_UID:-unset}"',
    ]
    env = {**server_env, "TLS_UID": "65534", "TLS_GID": "65534"}
    with TcpServer([], who, env) as srv:
        res = tcpclient(srv.port, ["-k", "localhost"], ["sh", "-c", "exec cat <&6"], client_env)
        assert res.returncode == 0, res.stderr
        assert srv.wait_end() == (0, [])
    app, uid, gid, engine, uidvar = res.stdout.decode().splitlines()
    assert app == "app 65534 65534 65534"
    assert uid.split() == ["Uid:", "65534", "65534", "65534", "65534"]
    assert gid.split() == ["Gid:", "65534", "65534", "65534", "65534"]
    assert "s6-tlsd" in engine  # prog's parent is the engine itself
    assert uidvar == "uidvar=unset"


# --- SNI keypairs ------------------------------------------------------------------------


def sni_env(server_env, sni_pki):
    env = dict(server_env)
    for name, (cert, key) in sni_pki.items():
        env[f"CERTFILE:{name}"], env[f"KEYFILE:{name}"] = cert, key
    return env


@pytest.mark.parametrize(
    ("level", "servername", "served"),
    [
        ("1", "a.example", "a.example"),
        ("1", "A.Example", "a.example"),
        ("1", "x.wild.example", "*.wild.example"),
        ("1", "a.b.wild.example", "default"),  # a wildcard is one label
        ("1", None, "default"),
        ("0", "a.example", "default"),  # -k 0 ignores CERTFILE:name
        ("2", "x.wild.example", "*.wild.example"),
    ],
)
def test_sni_picks_the_keypair_for_the_name(
    level, servername, served, server_env, client_env, pki, sni_pki
):
    name_args = ["-k", servername] if servername else []
    server, client = direct_pair(
        (["-k", level], SERVER_PRINT_ENV, sni_env(server_env, sni_pki)),
        (["--no-verify-cert", *name_args], CLIENT_PRINT_ENV, client_env),
    )
    assert server == (0, b"", IGNORED_SNI_KEYPAIRS + "\n" if level == "0" else "")
    assert client[0] == 0 and client[2] == NO_VERIFY
    client_seen, server_seen = eval(client[1])
    cert = pki["server_cert"] if served == "default" else sni_pki[served][0]
    assert client_seen["SSL_PEER_CERT_HASH"] == openssl_sha256(cert)
    sent = servername.lower() if servername else None  # names are sent in lower case
    assert server_seen.get("SSL_TLS_SNI_SERVERNAME") == sent


@pytest.mark.parametrize(
    ("servername", "reason"),
    [
        ("a.b.wild.example", "no keypair for server name a.b.wild.example under -k 2"),
        (None, "client sent no server name under -k 2"),
    ],
)
def test_sni_level_2_refuses_a_name_it_has_no_keypair_for(
    servername, reason, server_env, client_env, sni_pki, tmp_path
):
    env = sni_env(server_env, sni_pki)
    del env["CERTFILE"], env["KEYFILE"]
    name_args = ["-k", servername] if servername else []
    marker = tmp_path / "app-started"
    server, client = direct_pair(
        (["-k", "2"], touch_then(marker, "cat"), env),
        (["--no-verify-cert", *name_args], ["true"], client_env),
    )
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd") == reason  # not OpenSSL's "no suitable signature..."
    assert client[0] == 97
    assert fatal(client[2].removeprefix(NO_VERIFY), "s6-tlsc") == "tls alert handshake failure"
    assert not marker.exists()


def test_wildcard_keypair_passes_name_verification_but_not_for_two_labels(
    server_env, client_env, sni_pki
):
    env = sni_env(server_env, sni_pki)
    server, client = direct_pair(
        (["-k", "1"], ["cat"], env), (["-k", "x.wild.example"], ["true"], client_env)
    )
    assert (server[0], client[0]) == (0, 0), (server, client)
    server, client = direct_pair(
        (["-k", "1"], ["cat"], env), (["-k", "a.b.wild.example"], ["true"], client_env)
    )
    assert client[0] == 97
    assert fatal(client[2], "s6-tlsc") == (
        "certificate does not match the server name a.b.wild.example (certificate verify failed)"
    )
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd") == "tls alert bad certificate"


# --- close handling ----------------------------------------------------------------------


# Sends "bye", ends its output, then prints what comes back.
BYE = ["sh", "-c", "echo bye >&7; exec 7>&-; exec cat <&6"]


@pytest.mark.parametrize(
    ("client_close", "version", "expected"),
    [("-S", "1.2", 0), ("-s", "1.2", 98), ("-S", "1.3", 0), ("-s", "1.3", 0)],
)
def test_J_accepts_close_notify_and_rejects_a_bare_eof(
    client_close, version, expected, server_env, client_env
):
    """Under TLS 1.3 even -s ends with close_notify; under TLS 1.2 it is a bare EOF."""
    server, client = direct_pair(
        (["-J"], ["cat"], server_env),
        (
            [client_close, "-k", "localhost"],
            BYE,
            {**client_env, "TLS_MAX_VERSION": version},
        ),
    )
    assert client[0] == 0
    assert server[0] == expected
    if expected:
        assert fatal(server[2], "s6-tlsd") == "peer closed the connection without close_notify"
    else:
        assert client[1] == b"bye\n"
        assert server[2] == ""


# --- failures: exit code and one line ---------------------------------------------------


def test_required_client_certificate_missing_exits_97_before_the_application(
    server_env, client_env, tmp_path
):
    marker = tmp_path / "app-started"
    server, client = direct_pair(
        (["-y"], touch_then(marker, "cat"), server_env),
        (["-k", "localhost"], ["sh", "-c", "exec cat <&6"], client_env),
    )
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd") == "peer did not return a certificate"
    assert not marker.exists()
    # TLS 1.3: the client finished its handshake before the server's verdict came
    assert client[0] == 98
    assert fatal(client[2], "s6-tlsc") == "TLS error: tlsv13 alert certificate required"


def test_client_certificate_from_another_ca_exits_97(server_env, client_env, stranger, tmp_path):
    marker = tmp_path / "app-started"
    server, client = direct_pair(
        (["-y"], touch_then(marker, "cat"), server_env),
        (["-y", "-k", "localhost"], ["sh", "-c", "exec cat <&6"], {**client_env, **stranger}),
    )
    assert server[0] == 97
    assert fatal(server[2], "s6-tlsd").startswith(
        "certificate verify failed at depth 0: unable to get local issuer certificate"
    )
    assert not marker.exists()
    assert client[0] == 98
    assert fatal(client[2], "s6-tlsc") == "TLS error: tlsv1 alert unknown ca"


def run_against_raw_peer(args, env, tmp_path, send: bytes | None) -> tuple[int, str, bool]:
    """s6-tlsd on a socket whose peer sends ``send`` (then EOF), or nothing (stays silent).

    Returns the exit code, stderr and whether the application started.
    """
    marker = tmp_path / "app-started"
    s, c = tcp_pair()
    with c:
        tlsd = spawn_tlsd(args, touch_then(marker, "cat"), env, s)
        if send is not None:
            c.sendall(send)
            c.shutdown(socket.SHUT_WR)
        code, _, err = finish(tlsd)
    return code, err, marker.exists()


def test_garbage_instead_of_a_client_hello_exits_97(server_env, tmp_path):
    code, err, started = run_against_raw_peer([], server_env, tmp_path, b"hello, not TLS\r\n\r\n")
    assert (code, started) == (97, False)
    assert fatal(err, "s6-tlsd") == "wrong version number"


def test_under_tcpserver_a_connection_s_fatal_line_names_its_peer_and_pid(server_env):
    with (
        TcpServer([], ["true"], server_env) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=30) as c,
    ):
        port = c.getsockname()[1]
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        code, lines = srv.wait_end()
    assert code == 97
    assert lines == [f"s6-tlsd: fatal: peer 127.0.0.1:{port} pid {srv.ended}: http request"]


@pytest.mark.parametrize(
    ("stdin", "kind"),
    [("/dev/null", "a character device (a terminal, /dev/null)"), ("listening", "a listening")],
)
def test_stdin_that_is_no_connection_is_a_usage_error_at_once(stdin, kind, server_env):
    with socket.create_server(("127.0.0.1", 0)) as lis:
        given = open(stdin, "rb") if stdin.startswith("/") else lis  # noqa: SIM115
        with given:
            res = subprocess.run(
                [*program("s6-tlsd"), "--", "cat"],
                stdin=given,
                stdout=given,
                env=server_env,
                stderr=subprocess.PIPE,
                timeout=30,
            )
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), "s6-tlsd").startswith(f"stdin is {kind}")


def test_client_hello_cut_in_the_middle_exits_97(server_env, tmp_path):
    hello = client_hello()
    assert hello[0] == 0x16 and len(hello) > 100  # a handshake record
    code, err, started = run_against_raw_peer([], server_env, tmp_path, hello[: len(hello) // 2])
    assert (code, started) == (97, False)
    assert fatal(err, "s6-tlsd") == "peer closed the connection during the handshake"


def test_idle_peer_times_out_with_K_and_exits_98(server_env, tmp_path):
    start = time.monotonic()
    code, err, started = run_against_raw_peer(["-K", "300"], server_env, tmp_path, None)
    elapsed = time.monotonic() - start
    assert (code, started) == (98, False)
    assert fatal(err, "s6-tlsd") == "handshake timed out"
    assert 0.3 <= elapsed < 10


@pytest.mark.parametrize(
    ("args", "change", "code", "message"),
    [
        ([], {"CERTFILE": None}, 100, "CERTFILE and KEYFILE must be set together"),
        ([], {"CERTFILE": None, "KEYFILE": None}, 100, "CERTFILE and KEYFILE must be set"),
        (
            [],
            {"CERTFILE": "/nonexistent/cert.pem"},
            96,
            "unable to read CERTFILE /nonexistent/cert.pem: No such file or directory",
        ),
        ([], {"KEYFILE": "@ca"}, 96, "KEYFILE @ca holds no PEM private key: give a private key"),
        (
            [],
            {"KEYFILE": "@client_key"},
            96,
            "KEYFILE @client_key does not match the certificate in CERTFILE @server_cert:",
        ),
        (
            ["-k", "1"],
            {"KEYFILE:x.example": "@server_key"},
            96,
            "unpaired SNI keypair: KEYFILE:x.example is set but CERTFILE:x.example is not",
        ),
        (["-k", "2"], {}, 100, "-k 2 needs at least one CERTFILE:name/KEYFILE:name pair"),
        (["-k", "3"], {}, 100, "the server's -k takes an SNI level: 0, 1 or 2"),
        (["-y"], {"CAFILE": None}, 100, "-Y and -y need CAFILE or CADIR"),
        ([], {"TLS_UID": "nobody"}, 100, "invalid TLS_UID: 'nobody' is not a numeric id"),
        ([], {"TLS_GID": "-1"}, 100, "invalid TLS_GID: '-1' is not a numeric id"),
        (["-X"], {}, 100, "unrecognized option: -X (see s6-tlsd --help)"),
        (["-K", "soon"], {}, 100, "-K must be an unsigned integer, not 'soon'"),
    ],
)
def test_bad_configuration_exits_before_the_handshake(args, change, code, message, server_env, pki):
    env = dict(server_env)
    for name, value in change.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = pki[value[1:]] if value.startswith("@") else value
    s, c = tcp_pair()
    with c:
        tlsd = spawn_tlsd(args, ["cat"], env, s)
        got, _, err = finish(tlsd)
        c.settimeout(10)
        assert c.recv(1) == b""  # nothing was sent: not a byte of handshake
    assert got == code
    for name, path in pki.items():
        message = message.replace(f"@{name}", path)
    assert fatal(err, "s6-tlsd").startswith(message)

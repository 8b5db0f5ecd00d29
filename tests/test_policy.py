"""TLS policy against real peers: versions, suites, groups, ALPN, session tickets.

Each server is a real s6-tlsd under tcpserver or a real s6-tlsserver, and
each client a real ``openssl s_client`` (OpenSSL 3.0) or s6-tlsc.
"""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import program
from openssl_peer import s_client
from server_helpers import serving
from ucspi_helpers import LineReader, TcpServer, fatal, tcpclient, touch_then

from s6tls.tls import ossl as ossl
from s6tls.tls.context import default_groups

SHOW = ["sh", "-c", 'echo "alpn=${SSL_ALPN_PROTOCOL-unset} resumed=$SSL_SESSION_RESUMED"']


@pytest.fixture(scope="module")
def rsa_env(rsa_keypair) -> dict[str, str]:
    """A server environment with an RSA certificate from the trusted CA."""
    return {**os.environ, "CERTFILE": rsa_keypair[0], "KEYFILE": rsa_keypair[1]}


@pytest.fixture(scope="module")
def ecdsa_server(pki):
    env = {**os.environ, "CERTFILE": pki["server_cert"], "KEYFILE": pki["server_key"]}
    with serving(["-S"], ["true"], env) as (_server, port):
        yield port


@pytest.fixture(scope="module")
def rsa_server(rsa_env):
    with serving(["-S"], ["true"], rsa_env) as (_server, port):
        yield port


# --- versions and suites -----------------------------------------------------------------

TLS12_FORWARD_SECRET_AEAD = {
    "ecdsa": [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ],
    "rsa": [
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ],
}
# What OpenSSL's own defaults accept and Mozilla's intermediate profile does not.
TLS12_REFUSED = {
    "ecdsa": ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"],
    "rsa": [
        "AES128-SHA",  # static RSA key exchange, CBC, SHA-1
        "AES256-GCM-SHA384",  # static RSA key exchange
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-RSA-AES256-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
    ],
}


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_tls_1_2_offers_exactly_the_forward_secret_aead_suites(kind, ecdsa_server, rsa_server):
    port = ecdsa_server if kind == "ecdsa" else rsa_server
    for cipher in TLS12_FORWARD_SECRET_AEAD[kind]:
        peer = s_client(port, "-tls1_2", "-cipher", cipher)
        assert (peer.protocol, peer.cipher) == ("TLSv1.2", cipher), peer.err
    for cipher in TLS12_REFUSED[kind]:
        peer = s_client(port, "-tls1_2", "-cipher", cipher)
        assert not peer.connected and peer.code == 1, cipher


@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(flag, ecdsa_server):
    peer = s_client(ecdsa_server, flag, "-cipher", "DEFAULT@SECLEVEL=0")
    assert not peer.connected


def test_the_server_order_of_suites_wins(ecdsa_server):
    offered = "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256"
    peer = s_client(ecdsa_server, "-tls1_2", "-cipher", offered)
    assert peer.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_versions_suites_and_groups_follow_the_variables(server_env):
    env = {
        **server_env,
        "TLS_MIN_VERSION": "1.3",
        "TLS_CIPHERSUITES": "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_GROUPS": "P-384",
    }
    with serving(["-S"], ["true"], env) as (_server, port):
        assert not s_client(port, "-tls1_2").connected
        peer = s_client(port)
        assert (peer.protocol, peer.cipher) == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")
        assert "secp384r1" in (peer.fact("Server Temp Key") or "")
        assert not s_client(port, "-ciphersuites", "TLS_AES_128_GCM_SHA256").connected
        assert not s_client(port, "-groups", "X25519").connected
        assert s_client(port, "-groups", "P-384").connected


@pytest.mark.parametrize(("group", "admitted"), [("X25519", True), ("P-256", True),
    ("P-384", True), ("P-521", False), ("X448", False), ("ffdhe2048", False)])  # fmt: skip
def test_default_groups_are_x25519_p256_p384(group, admitted, ecdsa_server):
    assert s_client(ecdsa_server, "-groups", group).connected == admitted


def test_the_hybrid_post_quantum_group_comes_first_where_openssl_has_it():
    groups = default_groups().split(":")
    assert groups[-3:] == ["X25519", "P-256", "P-384"]
    assert (groups[0] == ossl.HYBRID_GROUP) == ossl.has_group(ossl.HYBRID_GROUP)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TLS_CIPHERS", "NO-SUCH-CIPHER", "invalid TLS_CIPHERS: OpenSSL accepts no cipher"),
        ("TLS_CIPHERSUITES", "TLS_NO_SUCH_SUITE", "invalid TLS_CIPHERSUITES: OpenSSL refuses"),
        ("TLS_GROUPS", "X25519:brainpool", "invalid TLS_GROUPS: OpenSSL refuses"),
        ("TLS_MAX_VERSION", "1.4", "invalid TLS_MAX_VERSION: '1.4' is not 1.2 or 1.3"),
    ],
)
def test_a_value_openssl_refuses_is_a_usage_error_before_any_handshake(
    variable, value, message, server_env
):
    with TcpServer([], ["true"], {**server_env, variable: value}) as srv:
        peer = s_client(srv.port)
        code, lines = srv.wait_end()
    assert not peer.connected
    assert code == 100
    assert fatal(lines, "s6-tlsd").startswith(message)


# --- ALPN --------------------------------------------------------------------------------


def test_alpn_gives_the_servers_first_choice_to_the_application(server_env):
    env = {**server_env, "TLS_ALPN": "h2,http/1.1"}
    with TcpServer(["-S"], SHOW, env) as srv:
        peer = s_client(srv.port, "-alpn", "http/1.1,h2")
        assert srv.wait_end() == (0, [])
        plain = s_client(srv.port)  # a client without ALPN is served without
        assert srv.wait_end() == (0, [])
    assert peer.out == b"alpn=h2 resumed=0\n"
    assert plain.out == b"alpn=unset resumed=0\n"


def test_alpn_without_overlap_is_refused_with_no_application_protocol(server_env, tmp_path):
    marker = tmp_path / "started"
    env = {**server_env, "TLS_ALPN": "h2,http/1.1"}
    with TcpServer([], touch_then(marker, "true"), env) as srv:
        peer = s_client(srv.port, "-alpn", "spdy/3")
        code, lines = srv.wait_end()
    assert "alert no application protocol" in peer.err
    assert code == 97
    assert fatal(lines, "s6-tlsd") == "no application protocol in common (TLS_ALPN h2,http/1.1)"
    assert not marker.exists()


def test_s6_tlsc_offers_its_alpn_list(server_env, client_env):
    server_alpn = {**server_env, "TLS_ALPN": "imap,h2"}
    with TcpServer(["-S"], SHOW, server_alpn) as srv:
        res = tcpclient(srv.port, ["-k", "localhost"], ["sh", "-c", "cat <&6"],
                        {**client_env, "TLS_ALPN": "h2,http/1.1"})  # fmt: skip
        assert srv.wait_end() == (0, [])
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"alpn=h2 resumed=0\n"


# --- session tickets ---------------------------------------------------------------------


def test_s6_tlsd_issues_no_session_ticket(server_env):
    with TcpServer(["-S"], ["true"], server_env) as srv:
        for version in ("-tls1_3", "-tls1_2"):
            peer = s_client(srv.port, version, "-msg")
            assert srv.wait_end() == (0, [])
            assert peer.connected
            assert peer.out.count(b"NewSessionTicket") == 0, version


def test_s6_tlsserver_children_resume_each_others_sessions_until_sighup(server_env, tmp_path):
    session = str(tmp_path / "session.pem")
    with serving(["-S", "-v"], SHOW, server_env) as (server, port):
        log = LineReader(server.stderr)
        first = s_client(port, "-msg", "-sess_out", session)
        assert first.out.count(b"NewSessionTicket") == 2
        assert b"alpn=unset resumed=0\n" in first.out
        for _ in range(3):  # each connection is served by another child
            again = s_client(port, "-sess_in", session)
            assert again.out == b"alpn=unset resumed=1\n", again.err
        server.send_signal(signal.SIGHUP)  # a new ticket key
        while "reloaded the keypairs" not in log.readline():
            pass
        refused = s_client(port, "-sess_in", session)
        assert refused.out == b"alpn=unset resumed=0\n"


def test_openssl_s_time_reuse_resumes_across_children(server_env, pki):
    # s_time reads the answer (-www), so the TLS 1.3 tickets that come before it
    # are in; -S ends each connection with close_notify, without which OpenSSL 3
    # counts the end as an error and forgets the session.
    with serving(["-S"], ["sh", "-c", "echo HTTP/1.0 200 OK; echo"], server_env) as (_server, port):
        res = subprocess.run(
            ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse", "-time", "2",
             "-www", "/", "-CAfile", pki["ca"]],
            capture_output=True, timeout=60,
        )  # fmt: skip
    out = res.stdout.decode()
    # s_time prints one letter per connection: 'r' for a resumed one, '*' for a new one.
    letters = re.search(r"starting\s*\n([*r]+)", out)
    assert letters, out
    assert letters.group(1).count("r") >= 2 and "*" not in letters.group(1)[1:], out


def client_with_session_dir(port: int, directory: Path, pki, **extra: str):
    return subprocess.run(
        [*program("s6-tlsclient"), "-k", "localhost", "127.0.0.1", str(port),
         "sh", "-c", "cat <&6"],
        env={**os.environ, "CAFILE": pki["ca"], "TLS_SESSION_DIR": str(directory), **extra},
        capture_output=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_successive_clients_resume_through_tls_session_dir(version, server_env, pki, tmp_path):
    with serving(["-S"], SHOW, {**server_env, "TLS_MAX_VERSION": version}) as (_server, port):
        first = client_with_session_dir(port, tmp_path, pki)
        second = client_with_session_dir(port, tmp_path, pki)
        # Another policy (here, trust anchors) does not reuse the session.
        other = client_with_session_dir(port, tmp_path, pki, CADIR=str(tmp_path))
    assert first.stdout == b"alpn=unset resumed=0\n", first.stderr
    assert second.stdout == b"alpn=unset resumed=1\n", second.stderr
    assert other.stdout == b"alpn=unset resumed=0\n", other.stderr
    kept = list(tmp_path.iterdir())
    assert [p.name for p in kept] == [f"localhost:{port}"]
    assert kept[0].stat().st_mode & 0o777 == 0o600


def test_tls_session_dir_that_cannot_be_written_is_a_configuration_error(pki, tmp_path):
    res = client_with_session_dir(1, tmp_path / "missing", pki)
    assert res.returncode == 96
    assert fatal(res.stderr.decode(), "s6-tlsclient") == (
        f"TLS_SESSION_DIR {tmp_path / 'missing'} is not a directory s6tls can write to"
    )

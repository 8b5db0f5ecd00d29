"""Pre-shared keys against real peers: openssl s_client and s_server, gnutls-cli.

With a PSK no certificate is needed on either side; a wrong key fails the
handshake before the application starts; the identity reaches it.
"""

import os
import subprocess

import pytest
from conftest import PSK_KEY as KEY
from openssl_peer import s_client
from ucspi_helpers import LineReader, TcpServer, fatal, tcpclient, touch_then

SHOW = ["sh", "-c", 'echo "psk=${SSL_PSK_IDENTITY-unset} resumed=$SSL_SESSION_RESUMED $SSL_CIPHER"']


def psk_server_env(pskfile: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CERTFILE", "KEYFILE")}
    return {**env, "PSKFILE": pskfile, **extra}


def test_openssl_s_client_with_a_psk_and_no_certificate_anywhere(pskfile):
    with TcpServer(["-S"], SHOW, psk_server_env(pskfile)) as srv:
        peer = s_client(srv.port, "-psk_identity", "alice", "-psk", KEY)
        assert srv.wait_end() == (0, [])
    assert peer.out == b"psk=alice resumed=0 TLS_AES_128_GCM_SHA256\n"


def test_gnutls_cli_with_a_psk(pskfile):
    with TcpServer(["-S"], SHOW, psk_server_env(pskfile)) as srv:
        res = subprocess.run(
            ["gnutls-cli", "-p", str(srv.port), "127.0.0.1", "--pskusername", "alice",
             "--pskkey", KEY, "--priority", "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )  # fmt: skip
        assert srv.wait_end() == (0, [])
    assert res.returncode == 0, res.stderr
    assert b"psk=alice resumed=0 TLS_AES_128_GCM_SHA256\n" in res.stdout


@pytest.mark.parametrize(
    ("version", "psk", "reason"),
    [
        ("1.3", ["-psk_identity", "alice", "-psk", "ff" * 24], None),  # OpenSSL's own words
        ("1.3", ["-psk_identity", "mallory", "-psk", KEY], "client offered PSK identity mallory"),
        ("1.3", [], "client offered no PSK, and PSKFILE is all this server has"),
        ("1.2", [], "client offered no PSK, and PSKFILE is all this server has"),
    ],
)
def test_a_wrong_key_an_unknown_identity_or_no_psk_fails_the_handshake_saying_which(
    version, psk, reason, pskfile, tmp_path
):
    marker = tmp_path / "started"
    env = psk_server_env(pskfile, TLS_MAX_VERSION=version)
    with TcpServer([], touch_then(marker, "true"), env) as srv:
        peer = s_client(srv.port, *psk)
        code, lines = srv.wait_end()
    assert not peer.connected
    assert code == 97
    line = fatal(lines, "s6-tlsd")
    assert line.startswith(reason) if reason else "PSK" not in line, line
    assert "signature algorithm" not in line and "shared cipher" not in line
    assert not marker.exists()


def test_a_psk_only_server_offers_tls_1_2_psk_suites_by_default(pskfile):
    with TcpServer(["-S"], SHOW, psk_server_env(pskfile, TLS_MAX_VERSION="1.2")) as srv:
        peer = s_client(srv.port, "-psk_identity", "alice", "-psk", KEY)
        assert srv.wait_end() == (0, [])
    assert peer.out == b"psk=alice resumed=0 ECDHE-PSK-CHACHA20-POLY1305\n"


def test_tls_1_2_psk_suites_when_asked(pskfile):
    env = psk_server_env(
        pskfile,
        TLS_MAX_VERSION="1.2",
        TLS_CIPHERS="ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256",
    )
    with TcpServer(["-S"], SHOW, env) as srv:
        peer = s_client(srv.port, "-psk_identity", "alice", "-psk", KEY)
        assert srv.wait_end() == (0, [])
    assert peer.out == b"psk=alice resumed=0 ECDHE-PSK-CHACHA20-POLY1305\n"


def test_a_certificate_server_with_a_psk_serves_both_kinds_of_client(pskfile, server_env, pki):
    env = {**server_env, "PSKFILE": pskfile}
    with TcpServer(["-S"], SHOW, env) as srv:
        psk = s_client(srv.port, "-psk_identity", "alice", "-psk", KEY)
        assert srv.wait_end() == (0, [])
        cert = s_client(srv.port, "-CAfile", pki["ca"], "-verify_return_error")
        assert srv.wait_end() == (0, [])
    assert psk.out == b"psk=alice resumed=0 TLS_AES_128_GCM_SHA256\n"
    assert cert.out == b"psk=unset resumed=0 TLS_AES_128_GCM_SHA256\n"


@pytest.mark.parametrize(("identity", "expected"), [(None, 97), ("alice", 0), ("bob", 97)])
def test_s6_tlsc_against_openssl_s_server_with_a_psk(identity, expected, pskfile):
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-nocert", "-naccept", "1",
         "-psk_identity", "alice", "-psk", KEY],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out = LineReader(server.stdout)
        while not (line := out.readline()).startswith("ACCEPT"):
            pass
        port = int(line.rsplit(":", 1)[1])
        env = {**os.environ, "PSKFILE": pskfile}
        if identity:
            env["PSK_IDENTITY"] = identity
        # The first line of PSKFILE is bob's: without PSK_IDENTITY, s6-tlsc offers it.
        res = tcpclient(port, [], ["sh", "-c", 'echo "psk=$SSL_PSK_IDENTITY" >&7'], env)
    finally:
        server.kill()
        rest, _ = server.communicate(timeout=30)
    assert res.returncode == expected, res.stderr
    assert (b"psk=alice\n" in out.buf + rest) == (expected == 0)


def test_under_y_a_psk_client_needs_no_certificate_and_a_plain_one_still_does(pskfile, server_env):
    env = {**server_env, "PSKFILE": pskfile}
    with TcpServer(["-y", "-S"], SHOW, env) as srv:
        psk = s_client(srv.port, "-psk_identity", "alice", "-psk", KEY)
        assert srv.wait_end() == (0, [])
        plain = s_client(srv.port)
        code, lines = srv.wait_end()
    assert psk.out == b"psk=alice resumed=0 TLS_AES_128_GCM_SHA256\n"
    assert (plain.out, code) == (b"", 97)
    assert fatal(lines, "s6-tlsd") == "peer did not return a certificate"

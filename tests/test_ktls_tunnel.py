"""The programs with --ktls inside the guest: every suite, both ways, real peers.

Each case moves SIZE bytes each way at once (2 MiB by default, 128 records;
256 MiB with S6TLS_SLOW=1: in UML, whose kernel crypto has no AES-NI, the
full size takes minutes per case) and checks both by SHA-256:

* s6-tlsserver --ktls and s6-tlsclient --ktls, the kernel at both ends;
* s6-tlsserver --ktls against ``openssl s_client``, and s6-tlsclient
  --ktls against ``openssl s_server``: a userspace peer proves the wire
  format, the keys and the sequence numbers (the TLS 1.3 server's session
  tickets included).

The -v 2 line of each s6tls program names the path that carried the data,
and /proc/net/tls_stat counts the connections the kernel ran.
"""

import hashlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from apps.stream_check import stream, stream_sha256
from conftest import ROOT, program
from ktls_helpers import CASES, IDS, one_connection, stop
from server_helpers import start_server
from test_faults import s_server
from test_starttls import s_client, smtp_server
from ucspi_helpers import direct_pair

from s6tls.ktls import keys as ktls_keys

pytestmark = pytest.mark.guest

SLOW = os.environ.get("S6TLS_SLOW") == "1"
SIZE = (256 if SLOW else 2) << 20
TIMEOUT = 1200 if SLOW else 120
STREAM_CHECK = [sys.executable, str(ROOT / "tests/apps/stream_check.py"), str(SIZE)]
SUITE_NAMES = {
    ktls_keys.AES_128_GCM: "AES-128-GCM",
    ktls_keys.AES_256_GCM: "AES-256-GCM",
    ktls_keys.CHACHA20_POLY1305: "CHACHA20-POLY1305",
}


def policy(version: int, cipher: str) -> dict[str, str]:
    """The environment that limits an s6tls program to one version and one suite."""
    if version == ktls_keys.TLS_1_3_VERSION:
        return {"TLS_MIN_VERSION": "1.3", "TLS_MAX_VERSION": "1.3", "TLS_CIPHERSUITES": cipher}
    return {"TLS_MIN_VERSION": "1.2", "TLS_MAX_VERSION": "1.2", "TLS_CIPHERS": cipher}


def openssl_policy(version: int, cipher: str) -> list[str]:
    if version == ktls_keys.TLS_1_3_VERSION:
        return ["-tls1_3", "-ciphersuites", cipher]
    return ["-tls1_2", "-cipher", cipher]


def kernel_path(version: int, cipher: str) -> str:
    name = "TLSv1.3" if version == ktls_keys.TLS_1_3_VERSION else "TLSv1.2"
    suite = ktls_keys.suite_of(cipher)
    assert suite is not None
    return f"path kernel TLS {name} {suite.name}"


def tls_stat() -> dict[str, int]:
    out = {}
    for line in Path("/proc/net/tls_stat").read_text().splitlines():
        name, value = line.split()
        out[name] = int(value)
    return out


def checked(out_file: Path) -> None:
    """The stream_check result: both ways exactly the stream."""
    want = stream_sha256(SIZE)
    assert out_file.read_text().split() == ["sent", want, "received", want, str(SIZE)]


def feed_and_read(proc: subprocess.Popen) -> tuple[int, str]:
    """Write the stream into ``proc``'s stdin while reading SIZE bytes of its stdout.

    Returns (bytes read, their SHA-256).  The stdin stays open: a userspace
    ``openssl`` ends when its peer closes the connection, not at its EOF.
    """
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        for piece in stream(SIZE):
            proc.stdin.write(piece)
        proc.stdin.flush()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    got = hashlib.sha256()
    total = 0
    while total < SIZE and (chunk := proc.stdout.read1(min(65536, SIZE - total))):
        got.update(chunk)
        total += len(chunk)
    feeder.join(timeout=TIMEOUT)
    return total, got.hexdigest()


@pytest.fixture
def env(server_env):
    """Both ends' environment: the server's keypair, and the CA a client checks it with."""
    return server_env


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_both_ends_in_the_kernel(env, tmp_path, reap, version, cipher):
    before = tls_stat()
    client, server_err = one_connection(
        (["--ktls"], [*STREAM_CHECK, "0", "1", str(tmp_path / "server")]),
        (["--ktls"], [*STREAM_CHECK, "6", "7", str(tmp_path / "client")]),
        env,
        {**env, **policy(version, cipher)},
        TIMEOUT,
    )
    assert client.returncode == 0, client.stderr
    checked(tmp_path / "client")
    checked(tmp_path / "server")
    for err in (client.stderr.decode(), server_err):
        assert kernel_path(version, cipher) in err, err
        assert f"in {SIZE} out {SIZE}" in err, err
        assert "--ktls" not in err  # no start-up warning where the kernel has the module
    after = tls_stat()
    assert after["TlsTxSw"] - before["TlsTxSw"] == 2
    assert after["TlsRxSw"] - before["TlsRxSw"] == 2


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_kernel_server_and_openssl_client(env, tmp_path, reap, version, cipher):
    server_env = {**env, **policy(version, cipher)}
    server, port = start_server(  # -S: s_client takes a bare EOF for an attack
        ["-v", "-S", "--ktls"], [*STREAM_CHECK, "0", "1", str(tmp_path / "server")], server_env
    )
    reap.append(server)
    peer = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            env["CAFILE"],
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reap.append(peer)
    got = feed_and_read(peer)
    peer.stdin.close()
    assert peer.wait(timeout=TIMEOUT) == 0
    server_err = stop(server)
    assert got == (SIZE, stream_sha256(SIZE))
    checked(tmp_path / "server")
    assert kernel_path(version, cipher) in server_err, server_err


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=IDS)
def test_kernel_client_and_openssl_server(env, pki, tmp_path, reap, version, cipher):
    peer, port = s_server(pki, *openssl_policy(version, cipher))
    reap.append(peer)
    client = subprocess.Popen(
        [
            *program("s6-tlsclient"),
            "-v",
            "--ktls",
            "-k",
            "localhost",
            "127.0.0.1",
            str(port),
            *STREAM_CHECK,
            "6",
            "7",
            str(tmp_path / "client"),
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    reap.append(client)
    got = feed_and_read(peer)
    _out, err = client.communicate(timeout=TIMEOUT)
    peer.stdin.close()
    peer.wait(timeout=TIMEOUT)
    assert client.returncode == 0, err
    assert got == (SIZE, stream_sha256(SIZE))
    checked(tmp_path / "client")
    assert kernel_path(version, cipher) in err.decode(), err


def test_the_line_names_the_path(env, tmp_path, reap):
    """The failing twin of the checks above: without --ktls the line says userspace."""
    client, server_err = one_connection(
        ([], [*STREAM_CHECK, "0", "1", str(tmp_path / "s")]),
        ([], [*STREAM_CHECK, "6", "7", str(tmp_path / "c")]),
        env,
        timeout=TIMEOUT,
    )
    assert client.returncode == 0
    for err in (client.stderr.decode(), server_err):
        assert re.search(r" path userspace$", err, re.MULTILINE), err


def test_s6_tlsd_and_s6_tlsc_on_one_tcp_connection(env):
    """The UCSPI pair (fds 0/1 and 6/7, one socket each) takes the kernel path too."""
    (scode, _sout, serr), (ccode, cout, cerr) = direct_pair(
        (["-v", "2", "--ktls"], ["cat"], env),
        (
            ["-v", "2", "--ktls", "-k", "localhost"],
            # It closes only once the echo is back: by then both ends took over.
            ["sh", "-c", "echo through the kernel >&7; read line <&6; echo $line"],
            env,
        ),
    )
    assert (scode, ccode) == (0, 0), (serr, cerr)
    assert cout == b"through the kernel\n"
    for err in (serr, cerr):
        assert " path kernel TLS TLSv1.3 AES-256-GCM" in err, err


def test_starttls_hands_the_records_to_the_kernel_after_the_exchange(env, pki):
    """s6-ucspitlsd --ktls: cleartext SMTP, STARTTLS, then the kernel runs the records."""
    with smtp_server("Y", ["-S", "--ktls"], server_env=env) as server:
        client = s_client(server.port, pki)
        client.send("ECHO inside kernel TLS")
        assert client.expect("250 ") == "250 inside kernel TLS"
        client.send("QUIT")
        client.expect("221")
        code, err = client.finish()
        status, lines = server.wait_end()
    assert code == 0, err
    assert status == 0
    assert any(" path kernel TLS TLSv1.3 AES-256-GCM" in line for line in lines), lines

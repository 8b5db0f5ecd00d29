"""Everything a connection needs is imported before the privilege drop.

The programs run as root with TLS_UID/TLS_GID, through a wrapper that makes
every import after ``os.setuid`` fail: a module imported mid-handshake (the
name check, the peer's facts, OCSP, sessions) would break the connection,
as it does for a user who cannot read the installation.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from certs import TestCA
from conftest import ROOT
from ucspi_helpers import direct_pair

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")

WRAPPER = """
import os, sys
sys.path.insert(0, {root!r})
real_setuid = os.setuid

class NoImports:
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"{{name}} imported after the privilege drop")

def setuid(uid):
    real_setuid(uid)
    sys.meta_path.insert(0, NoImports())

os.setuid = setuid
from s6tls.{module} import main
main()
"""


def wrapped(module: str) -> list[str]:
    import sys

    return [sys.executable, "-c", WRAPPER.format(root=str(ROOT), module=module)]


@pytest.mark.parametrize("mode", [[], ["--ktls"]], ids=["userspace", "ktls"])
def test_a_connection_with_every_check_imports_nothing_after_the_drop(
    tmp_path, monkeypatch, request, mode
):
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server", "DNS:localhost")
    client = ca.issue("client", "DNS:client.example", "URI:spiffe://example.org/c")
    ca.register(server.cert_path)
    ocsp = ca.ocsp_response(server, "server.ocsp")
    # Where nobody can write (pytest's own directories are root's only).
    sessions = Path(tempfile.mkdtemp(prefix="s6tls-sessions-"))
    request.addfinalizer(lambda: shutil.rmtree(sessions))
    os.chown(sessions, 65534, 65534)
    ids = {"TLS_UID": "65534", "TLS_GID": "65534"}
    server_env = {
        **os.environ, **ids, "CERTFILE": server.cert_path, "KEYFILE": server.key_path,
        "CAFILE": ca.cert_path, "TLS_PEER_DNS": "client.example", "OCSPFILE": ocsp,
        "TLS_ALPN": "h2",
    }  # fmt: skip
    client_env = {
        **os.environ, **ids, "CERTFILE": client.cert_path, "KEYFILE": client.key_path,
        "CAFILE": ca.cert_path, "TLS_OCSP": "require", "TLS_ALPN": "h2",
        "TLS_SESSION_DIR": str(sessions), "TLS_PEER_URI": "spiffe://nowhere,x:y",
        "TLS_PEER_DNS": "localhost",
    }  # fmt: skip
    import ucspi_helpers

    monkeypatch.setattr(ucspi_helpers, "TLSD", wrapped("tlsd"))
    monkeypatch.setattr(ucspi_helpers, "TLSC", wrapped("tlsc"))
    # The applications run as nobody too: sh, not the venv's python.
    (code, _, err), (client_code, out, client_err) = direct_pair(
        (["-y", *mode], ["env"], server_env),
        (
            [*mode, "-y", "-k", "localhost"],
            ["sh", "-c", "env; echo; exec 7>&-; cat <&6"],
            client_env,
        ),
    )
    # What this kernel lacks for --ktls is said at start, before the drop: not this test's.
    err, client_err = (
        "".join(line for line in text.splitlines(True) if ": warning: --ktls: " not in line)
        for text in (err, client_err)
    )
    assert (code, err, client_code, client_err) == (0, "", 0, "")
    client_lines, server_lines = out.decode().split("\n\n", 1)
    client_seen = dict(line.split("=", 1) for line in client_lines.splitlines() if "=" in line)
    server_seen = dict(line.split("=", 1) for line in server_lines.splitlines() if "=" in line)
    assert server_seen["SSL_PEER_CERT_SAN_URI"] == "spiffe://example.org/c"
    assert server_seen["SSL_ALPN_PROTOCOL"] == client_seen["SSL_ALPN_PROTOCOL"] == "h2"
    assert client_seen["SSL_PEER_CERT_SAN_DNS"] == "localhost"
    assert [p.name for p in sessions.iterdir()] == ["localhost"]


def test_a_dtls_association_imports_nothing_after_the_drop(tmp_path, server_env, pki):
    """s6-dtlsserver's child drops to TLS_UID/TLS_GID before its handshake."""
    import subprocess

    from dtls_peer import DtlsClient

    env = {**server_env, "TLS_UID": "65534", "TLS_GID": "65534"}
    proc = subprocess.Popen(
        [*wrapped("dtlsserver"), "-1", "127.0.0.1", "0", "sh", "-c", "id -u >&1; cat"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        client = DtlsClient(port, pki["ca"])
        client.handshake()
        assert client.recv() == b"65534\n"
        client.send(b"echo")
        assert client.recv() == b"echo"
        client.close_notify()
        client.close()
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert err == b""

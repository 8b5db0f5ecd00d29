"""CRLs and OCSP with the real openssl ca and openssl ocsp, against real peers.

A root CA issues an intermediate, which issues the leaves; ``openssl ca``
revokes and makes the CRLs, ``openssl ocsp`` answers for the server's
certificate; the stale and expired ones (dates in the past) come from
cryptography.
"""

import os
import signal
import subprocess
from pathlib import Path

import pytest
from certs import TestCA
from conftest import STARTED, program
from openssl_peer import s_client
from server_helpers import lines_with, serving
from test_faults import s_server
from ucspi_helpers import LineReader, direct_pair, fatal, touch_then

SHOW = ["sh", "-c", 'echo "admitted $SSL_PEER_CERT_SAN_DNS"']


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("revocation")
    root = TestCA(base / "root", "s6tls test root")
    inter = TestCA(base / "inter", "s6tls test intermediate", parent=root)
    leaves = {
        "good": inter.issue("good", "DNS:good.example"),
        "revoked": inter.issue("revoked", "DNS:revoked.example"),
        "server": inter.issue("server", "DNS:localhost"),
        "server_revoked": inter.issue("server-revoked", "DNS:localhost"),
        "responder": inter.issue("responder", ocsp_signing=True),
    }
    for name in ("good", "server"):
        inter.register(leaves[name].cert_path)
    for name in ("revoked", "server_revoked"):
        inter.revoke(leaves[name].cert_path)
    files = {
        "inter_crl": inter.gencrl(),
        "expired_crl": inter.expired_crl(),
        "good_ocsp": inter.ocsp_response(leaves["server"], "good.ocsp"),
        "delegated_ocsp": inter.ocsp_response(
            leaves["server"], "delegated.ocsp", leaves["responder"]
        ),
        "revoked_ocsp": inter.ocsp_response(leaves["server_revoked"], "revoked.ocsp"),
        "stale_ocsp": inter.stale_ocsp_response(leaves["server"], "stale.ocsp"),
    }
    files["root_crl"] = root.gencrl()
    files["both_crls"] = concatenate(base / "both.pem", files["inter_crl"], files["root_crl"])
    files["inter_crl_der"] = str(base / "crl.der")
    subprocess.run(["openssl", "crl", "-in", files["inter_crl"], "-outform", "DER", "-out",
                    files["inter_crl_der"]], check=True, timeout=30)  # fmt: skip
    root.revoke(inter.cert_path)
    files["both_revoking_inter"] = concatenate(
        base / "both-revoking-inter.pem", files["inter_crl"], root.gencrl("root-crl-2.pem")
    )
    return root, inter, leaves, files


def concatenate(out: Path, *paths: str) -> str:
    out.write_bytes(b"".join(Path(p).read_bytes() for p in paths))
    return str(out)


# --- CRLs -------------------------------------------------------------------------------------


def server_env(pki, **extra: str) -> dict[str, str]:
    root, _inter, leaves, files = pki
    env = {
        **os.environ,
        "CERTFILE": leaves["server"].cert_path,
        "KEYFILE": leaves["server"].key_path,
        "CAFILE": root.cert_path,
    }
    return {**env, **{k: files.get(v, v) for k, v in extra.items()}}


@pytest.mark.parametrize(
    ("crl", "check", "admitted", "refusal"),
    [
        ("inter_crl", None, {"good"}, "certificate revoked"),
        ("inter_crl_der", None, {"good"}, "certificate revoked"),
        ("inter_crl", "leaf", {"good"}, "certificate revoked"),
        ("expired_crl", None, set(), "CRL has expired"),
        ("inter_crl", "chain", set(), "unable to get certificate CRL"),  # no root CRL
        ("both_crls", "chain", {"good"}, "certificate revoked"),
        ("both_revoking_inter", "chain", set(), "certificate revoked"),
        ("both_revoking_inter", "leaf", {"good"}, "certificate revoked"),
    ],
)
def test_a_revoked_client_certificate_is_refused_in_the_handshake(
    crl, check, admitted, refusal, pki
):
    _root, _inter, leaves, _files = pki
    extra = {"CRLFILE": crl} | ({"TLS_CRL_CHECK": check} if check else {})
    with serving(["-y"], SHOW, server_env(pki, **extra)) as (server, port):
        for kind in ("good", "revoked"):
            leaf = leaves[kind]
            peer = s_client(
                port, "-cert", leaf.cert_path, "-cert_chain", leaf.cert_path, "-key", leaf.key_path
            )
            assert (b"admitted" in peer.out) == (kind in admitted), (kind, peer.err)
            if kind not in admitted:  # OpenSSL's alert for what is wrong, never internal_error
                assert "alert internal error" not in peer.err, peer.err
        refusals = lines_with(server, "certificate verify failed", 2 - len(admitted))
    assert any(refusal in line for line in refusals), refusals


def test_a_crl_that_is_not_a_crl_is_a_configuration_error(pki, tmp_path):
    _root, _inter, leaves, _files = pki
    res = subprocess.run(
        [*program("s6-tlsd"), "-y", "true"],
        env=server_env(pki, CRLFILE=leaves["good"].cert_path),
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 96
    assert fatal(res.stderr.decode(), "s6-tlsd") == (
        f"CRLFILE {leaves['good'].cert_path} holds no PEM or DER CRL: give a CRL file"
    )


def test_an_expired_crl_is_a_warning_at_start_and_at_each_reload(pki, tmp_path):
    _root, inter, _leaves, files = pki
    crlfile = tmp_path / "crl.pem"
    crlfile.write_bytes(Path(files["expired_crl"]).read_bytes())
    warning = (
        f"s6-tlsserver: warning: the CRL of {inter.cert.subject.rfc4514_string()} in CRLFILE"
        f" {crlfile} expired on "
    )

    def reload(crl: str) -> list[str]:
        """The lines of a SIGHUP that made the server read ``crl``."""
        crlfile.write_bytes(Path(files[crl]).read_bytes())
        server.send_signal(signal.SIGHUP)
        return log.until("reloaded the keypairs")

    with serving(["-v", "-y"], ["true"], server_env(pki, CRLFILE=str(crlfile))) as (server, _port):
        log = LineReader(server.stderr)
        assert log.readline().startswith(warning)
        assert not [line for line in reload("inter_crl") if "CRL" in line]
        assert next(line for line in reload("expired_crl") if "CRL" in line).startswith(warning)


def test_crlfile_without_a_client_certificate_to_check_is_a_usage_error(pki):
    res = subprocess.run(
        [*program("s6-tlsd"), "true"],
        env=server_env(pki, CRLFILE="inter_crl"),
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), "s6-tlsd") == (
        "CRLFILE needs -Y or -y: it checks client certificates"
    )


# --- OCSP -------------------------------------------------------------------------------------


def test_the_server_staples_its_ocsp_response(pki):
    root, _inter, _leaves, _files = pki
    with serving(["-S"], ["true"], server_env(pki, OCSPFILE="good_ocsp")) as (_server, port):
        stapled = s_client(port, "-status", "-CAfile", root.cert_path, brief=False)
        unasked = s_client(port, "-CAfile", root.cert_path, brief=False)
    text = stapled.out.decode()
    assert "OCSP Response Status: successful" in text
    assert "Cert Status: good" in text
    assert "OCSP" not in unasked.out.decode()  # a client that did not ask gets none


def client_env(pki, **extra: str) -> dict[str, str]:
    root, _inter, _leaves, _files = pki
    return {**os.environ, "CAFILE": root.cert_path, "TLS_OCSP": "require", **extra}


@pytest.mark.parametrize(
    ("server", "ocspfile", "reason"),
    [
        ("server", "good_ocsp", None),
        ("server", "delegated_ocsp", None),
        ("server", "stale_ocsp", "the OCSP response is stale"),
        ("server", None, "the server stapled no OCSP response"),
        ("server_revoked", "revoked_ocsp", "the certificate is revoked"),
    ],
)
def test_tls_ocsp_require_accepts_only_a_good_current_response(
    server, ocspfile, reason, pki, tmp_path
):
    _root, _inter, leaves, files = pki
    env = server_env(pki)
    env["CERTFILE"], env["KEYFILE"] = leaves[server].cert_path, leaves[server].key_path
    if ocspfile:
        env["OCSPFILE"] = files[ocspfile]
    marker = tmp_path / "started"
    (code, _, err), (client_code, out, client_err) = direct_pair(
        (["-S"], touch_then(marker, "echo", "hello"), env),
        (["-k", "localhost"], ["sh", "-c", "cat <&6"], client_env(pki)),
    )
    if reason is None:
        assert (client_code, out) == (0, b"hello\n"), client_err
        return
    assert client_code == 97
    assert fatal(client_err, "s6-tlsc").startswith(reason)
    assert code == 97 and not marker.exists()
    if ocspfile == "stale_ocsp":
        assert "OCSPFILE" in err.splitlines()[0]  # the server warned at start


def test_a_stapled_response_that_cannot_be_read_fails_the_handshake_not_the_client(pki, tmp_path):
    """Its CertID names a hash cryptography does not know, which raises: 97, never 111."""
    _root, _inter, leaves, files = pki
    der = Path(files["good_ocsp"]).read_bytes()
    sha1 = bytes.fromhex("06052B0E03021A")  # the CertID's hash, as openssl ocsp writes it
    assert der.count(sha1) == 1
    unreadable = tmp_path / "unreadable.ocsp"
    unreadable.write_bytes(der.replace(sha1, bytes.fromhex("06052B0E03021B")))  # 1.3.14.3.2.27
    cert = leaves["server"].cert_path
    server, port = s_server(
        {"server_cert": cert, "server_key": leaves["server"].key_path},
        *("-cert_chain", cert, "-status_file", str(unreadable)),
    )
    STARTED.append(server)
    res = subprocess.run(
        [*program("s6-tlsclient"), "-k", "localhost", "127.0.0.1", str(port), "true"],
        env=client_env(pki), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    server.terminate()  # it may wait for its next connection
    _out, err = server.communicate(timeout=30)
    assert res.returncode == 97, res.stderr
    assert fatal(res.stderr, "s6-tlsclient").startswith(
        "unable to check the OCSP response: Signature algorithm OID: 1.3.14.3.2.27 not recognized"
    )
    assert b"SSL alert number 113" in err  # bad_certificate_status_response


def test_an_ocsp_response_for_another_certificate_is_a_configuration_error(pki):
    _root, _inter, _leaves, files = pki
    env = server_env(pki, OCSPFILE="revoked_ocsp")
    res = subprocess.run(
        [*program("s6-tlsd"), "true"], env=env, capture_output=True,
        timeout=30,
    )  # fmt: skip
    assert res.returncode == 96
    assert fatal(res.stderr.decode(), "s6-tlsd") == (
        f"OCSPFILE {files['revoked_ocsp']} is an OCSP response about another certificate:"
        " give the OCSP response for CERTFILE"
    )


def test_the_ocsp_response_is_read_again_on_sighup(pki, tmp_path):
    _root, _inter, _leaves, files = pki
    ocspfile = tmp_path / "ocsp.der"
    ocspfile.write_bytes(Path(files["good_ocsp"]).read_bytes())
    with serving(["-v"], ["true"], server_env(pki, OCSPFILE=str(ocspfile))) as (server, port):
        log = LineReader(server.stderr)
        first = subprocess.run(
            [*program("s6-tlsclient"), "-k", "localhost", "127.0.0.1",
             str(port), "true"], env=client_env(pki), capture_output=True, timeout=30,
        )  # fmt: skip
        assert first.returncode == 0, first.stderr
        ocspfile.write_bytes(Path(files["stale_ocsp"]).read_bytes())
        server.send_signal(signal.SIGHUP)
        while "reloaded the keypairs" not in log.readline():
            pass
        second = subprocess.run(
            [*program("s6-tlsclient"), "-k", "localhost", "127.0.0.1",
             str(port), "true"], env=client_env(pki), capture_output=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 97
        assert b"the OCSP response is stale" in second.stderr

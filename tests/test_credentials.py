"""Credentials as users hand them over: PEM or DER, encrypted keys, wrong files, old certificates.

Each case runs the real programs; a bad file is one line naming it and what
to do, exit 96, before a byte reaches the network.
"""

import os
import signal
import subprocess
from pathlib import Path

import pexpect
import pytest
from certs import DAY, NOW, TestCA
from conftest import program
from server_helpers import serving
from ucspi_helpers import LineReader, direct_pair, fatal, spawn_tlsd, tcp_pair

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("credentials-ca"))


@pytest.fixture(scope="module")
def files(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The server's keypair and the CA in PEM and DER, an encrypted key, its passphrase."""
    d = tmp_path_factory.mktemp("credentials")
    leaf = ca.issue("server", "DNS:localhost")
    out = {"cert": leaf.cert_path, "key": leaf.key_path, "ca": ca.cert_path}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    out["cert_der"], out["ca_der"] = str(d / "cert.der"), str(d / "ca.der")
    openssl("x509", "-in", leaf.cert_path, "-outform", "DER", "-out", out["cert_der"])
    openssl("x509", "-in", ca.cert_path, "-outform", "DER", "-out", out["ca_der"])
    out["key_der"], out["key_enc"] = str(d / "key.der"), str(d / "key.enc.pem")
    openssl("pkey", "-in", leaf.key_path, "-outform", "DER", "-out", out["key_der"])
    out["key_enc_der"] = str(d / "key.enc.der")
    pw = f"pass:{PASSPHRASE}"
    openssl("pkey", "-in", leaf.key_path, "-aes256", "-passout", pw, "-out", out["key_enc"])
    openssl("pkcs8", "-topk8", "-in", leaf.key_path, "-v2", "aes256", "-passout", pw,
            "-outform", "DER", "-out", out["key_enc_der"])  # fmt: skip
    out["pass"], out["wrong_pass"] = str(d / "pass"), str(d / "wrong")
    (d / "pass").write_text(PASSPHRASE + "\n")
    (d / "wrong").write_text("not it\n")
    out["garbage"] = str(d / "garbage")
    (d / "garbage").write_bytes(b"\x00\x01neither PEM nor DER\n")
    for name in ("key_der", "key_enc", "key_enc_der", "pass", "wrong_pass"):
        os.chmod(out[name], 0o600)
    out["other_key"] = ca.issue("other", "DNS:other.example").key_path
    return out


def serve_once(files, server: dict[str, str], client: dict[str, str] | None = None):
    """s6-tlsd with ``server``'s variables against s6-tlsc; both results."""
    server_env = {**os.environ, **{k: files.get(v, v) for k, v in server.items()}}
    client_env = {**os.environ, "CAFILE": files["ca"]}
    client_env.update({k: files.get(v, v) for k, v in (client or {}).items()})
    return direct_pair(
        ([], ["sh", "-c", "echo hello"], server_env),
        (["-k", "localhost"], ["sh", "-c", "cat <&6"], client_env),
    )


@pytest.mark.parametrize(
    ("server", "client"),
    [
        ({"CERTFILE": "cert_der", "KEYFILE": "key_der"}, {"CAFILE": "ca_der"}),
        ({"CERTFILE": "cert", "KEYFILE": "key_enc", "KEYPASSFILE": "pass"}, {}),
        ({"CERTFILE": "cert_der", "KEYFILE": "key_enc_der", "KEYPASSFILE": "pass"}, {}),
        ({"CERTFILE": "cert", "KEYFILE": "key", "KEYPASSFILE": "pass"}, {}),  # none needed
    ],
)
def test_pem_der_and_encrypted_keys_all_serve(server, client, files):
    (code, _, err), (client_code, out, client_err) = serve_once(files, server, client)
    assert (code, err) == (0, "")
    assert (client_code, out, client_err) == (0, b"hello\n", "")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"CERTFILE": "cert", "KEYFILE": "key_enc"},
         "KEYFILE @key_enc is encrypted: set KEYPASSFILE to a file holding its passphrase"),
        ({"CERTFILE": "cert", "KEYFILE": "key_enc_der"},
         "KEYFILE @key_enc_der is encrypted: set KEYPASSFILE"),
        ({"CERTFILE": "cert", "KEYFILE": "key_enc", "KEYPASSFILE": "wrong_pass"},
         "KEYPASSFILE does not decrypt KEYFILE @key_enc"),
        ({"CERTFILE": "cert", "KEYFILE": "other_key"},
         "KEYFILE @other_key does not match the certificate in CERTFILE @cert: give the key"),
        ({"CERTFILE": "garbage", "KEYFILE": "key"},
         "CERTFILE @garbage is neither PEM nor DER: give a certificate file"),
        ({"CERTFILE": "cert", "KEYFILE": "garbage"},
         "KEYFILE @garbage is neither PEM nor a DER key: give a private key file"),
        ({"CERTFILE": "key", "KEYFILE": "key"},
         "CERTFILE @key holds no PEM certificate: give a certificate file"),
    ],
)  # fmt: skip
def test_a_file_that_cannot_be_used_is_one_line_naming_it_and_exit_96(server, message, files):
    server_env = {**os.environ, **{k: files[v] for k, v in server.items()}}
    s, c = tcp_pair()
    with c:
        tlsd = spawn_tlsd([], ["true"], server_env, s)
        code = tlsd.wait(timeout=30)
        c.settimeout(10)
        assert c.recv(1) == b""  # not a byte sent
    for name, path in sorted(files.items(), key=lambda item: -len(item[0])):
        message = message.replace(f"@{name}", path)
    assert code == 96
    assert fatal(tlsd.stderr.read().decode(), "s6-tlsd").startswith(message)


def test_an_encrypted_key_never_prompts_on_a_terminal(files):
    env = {**os.environ, "CERTFILE": files["cert"], "KEYFILE": files["key_enc"]}
    child = pexpect.spawn(program("s6-tlsd")[0], [*program("s6-tlsd")[1:], "true"], env=env,
                          timeout=30)  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 96
    text = child.before.decode()
    assert "pass phrase" not in text.lower()
    assert "KEYFILE" in text and "is encrypted" in text


# --- warnings at start and on SIGHUP ------------------------------------------------------


def test_a_key_others_can_read_is_a_warning(files, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(Path(files["key"]).read_bytes())
    key.chmod(0o640)
    (code, _, err), _client = serve_once(files, {"CERTFILE": "cert", "KEYFILE": str(key)})
    assert code == 0
    assert err == (
        f"s6-tlsd: warning: KEYFILE {key} is readable by group or others (mode 0640):"
        " chmod go-rwx it\n"
    )


def test_an_expired_certificate_is_a_warning_naming_its_date_at_start_and_on_sighup(ca):
    expired = ca.issue("expired", "DNS:localhost", not_before=NOW - 3 * DAY, not_after=NOW - DAY)
    later = ca.issue("later", "DNS:localhost", not_before=NOW + DAY, not_after=NOW + 3 * DAY)
    env = {**os.environ, "CERTFILE": expired.cert_path, "KEYFILE": expired.key_path}
    with serving([], ["true"], env) as (server, _port):
        log = LineReader(server.stderr)
        day = expired.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert log.readline() == (
            f"s6-tlsserver: warning: the certificate in CERTFILE {expired.cert_path} expired on"
            f" {day}: peers will refuse it"
        )
        os.replace(later.cert_path, expired.cert_path)
        os.replace(later.key_path, expired.key_path)
        server.send_signal(signal.SIGHUP)
        day = later.cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert log.readline() == (
            f"s6-tlsserver: warning: the certificate in CERTFILE {expired.cert_path} is not"
            f" valid before {day}: peers will refuse it until then"
        )

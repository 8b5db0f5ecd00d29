"""Who the peer is: allow-lists, server names and IP addresses, and what reaches the environment.

Real processes throughout: s6-tlsserver or s6-tlsd against ``openssl
s_client`` or s6-tlsc, with certificates from ``certs.TestCA``; a raw TCP
client for ClientHellos no TLS library would send.
"""

import base64
import contextlib
import hashlib
import os
import socket
import struct
import subprocess
import sys

import pytest
from certs import TestCA
from conftest import STARTED, program
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from openssl_peer import s_client
from server_helpers import lines_with, serving
from test_faults import s_server
from ucspi_helpers import (
    CLIENT_PRINT_ENV,
    SERVER_PRINT_ENV,
    direct_pair,
    fatal,
    finish,
    spawn_tlsc,
    spawn_tlsd,
    tcp_pair,
    touch_then,
    unprefixed,
)

from s6tls.tls.peer import certificate_facts

ADMITTED = ["sh", "-c", 'echo "admitted $SSL_PEER_CERT_SAN_DNS"']


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("identity-ca"))


@pytest.fixture(scope="module")
def leaves(ca: TestCA):
    """One client certificate per kind of subjectAltName, and the server's."""
    return {
        "dns": ca.issue("dns", "DNS:client.example"),
        "uri": ca.issue("uri", "URI:spiffe://example.org/ns/prod/sa/web"),
        "email": ca.issue("email", "email:ops@example.org"),
        "ip": ca.issue("ip", "IP:192.0.2.7"),
        "server": ca.issue("server", "DNS:localhost", "DNS:xn--strae-oqa.example"),
        "server_ip": ca.issue("server-ip", "DNS:localhost", "IP:127.0.0.1", "IP:::1"),
    }


def spki(leaf) -> str:
    """The pin-sha256 of a leaf, computed by the openssl CLI."""
    pub = subprocess.run(
        ["openssl", "x509", "-in", leaf.cert_path, "-noout", "-pubkey"],
        capture_output=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pub, capture_output=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def server_env(ca: TestCA, leaf, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CERTFILE": leaf.cert_path,
        "KEYFILE": leaf.key_path,
        "CAFILE": ca.cert_path,
        **extra,
    }


# --- allow-lists on the server ---------------------------------------------------------

CASES = [
    ({"TLS_PEER_DNS": "client.example"}, {"dns"}),
    ({"TLS_PEER_URI": "spiffe://example.org/ns/prod/sa/web"}, {"uri"}),
    ({"TLS_PEER_EMAIL": "ops@EXAMPLE.org"}, {"email"}),
    ({"TLS_PEER_IP": "192.0.2.7"}, {"ip"}),
    ({"TLS_PEER_DNS": "other.example", "TLS_PEER_URI": "spiffe://example.org/ns/prod/sa/web"},
     {"uri"}),
    ({"TLS_PEER_URI": "spiffe://example.org/ns/prod/sa/WEB,spiffe://example.org/ns/prod"},
     set()),
    ({"TLS_PEER_SPKI": "@dns"}, {"dns"}),
]  # fmt: skip


@pytest.mark.parametrize(("lists", "admitted"), CASES)
def test_each_allow_list_admits_its_client_and_refuses_the_others_in_the_handshake(
    lists, admitted, ca, leaves
):
    lists = {k: spki(leaves[v[1:]]) if v.startswith("@") else v for k, v in lists.items()}
    with serving(["-y"], ADMITTED, server_env(ca, leaves["server"], **lists)) as (server, port):
        for kind in ("dns", "uri", "email", "ip"):
            leaf = leaves[kind]
            peer = s_client(port, "-cert", leaf.cert_path, "-key", leaf.key_path)
            assert (b"admitted" in peer.out) == (kind in admitted), (kind, peer.err)
            if kind not in admitted:  # refused inside the handshake, with what is wrong
                assert "alert bad certificate" in peer.err, peer.err
        refusals = lines_with(server, "not admitted", 4 - len(admitted))
    assert all(" TLS_PEER_" in line for line in refusals)


def test_allow_lists_need_a_required_client_certificate(ca, leaves):
    env = server_env(ca, leaves["server"], TLS_PEER_DNS="client.example")
    res = subprocess.run(
        [*program("s6-tlsd"), "-Y", "true"], env=env, capture_output=True, timeout=30
    )
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), "s6-tlsd").startswith("TLS_PEER_* allow-lists need -y")


# --- allow-lists and pins on the client --------------------------------------------------


def client_run(port: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*program("s6-tlsclient"), *args, "127.0.0.1", str(port), "true"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=30,
    )


def test_the_client_checks_its_allow_lists_and_pins_with_or_without_the_chain(ca, leaves):
    with serving([], ["true"], server_env(ca, leaves["server_ip"])) as (_server, port):
        pin = spki(leaves["server_ip"])
        good = client_run(port, [], {"CAFILE": ca.cert_path, "TLS_PEER_DNS": "localhost"})
        assert good.returncode == 0, good.stderr
        bad = client_run(port, [], {"CAFILE": ca.cert_path, "TLS_PEER_DNS": "elsewhere.example"})
        assert bad.returncode == 97
        assert b"certificate not admitted by TLS_PEER_DNS" in bad.stderr
        # A pin without the chain: no CAFILE, --no-verify-cert, only the key counts.
        pinned = client_run(port, ["--no-verify-cert"], {"TLS_PEER_SPKI": pin})
        assert pinned.returncode == 0, pinned.stderr
        wrong = client_run(port, ["--no-verify-cert"], {"TLS_PEER_SPKI": spki(leaves["dns"])})
        assert wrong.returncode == 97
        assert b"certificate not admitted by TLS_PEER_SPKI" in wrong.stderr


def test_a_certificate_that_cannot_be_parsed_is_refused_with_bad_certificate_not_a_crash(ca):
    """Two subjectAltName extensions, on which cryptography raises: a refusal in the
    handshake (97, its reason, bad_certificate), at -v 3 and with --no-verify-cert too."""
    two = ca.issue_with_two_sans("two-sans", "DNS:localhost", "DNS:other.example")
    server, port = s_server({"server_cert": two.cert_path, "server_key": two.key_path})
    STARTED.append(server)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    code, _out, client_err = finish(spawn_tlsc(["-v", "3", "--no-verify-cert"], ["true"], {}, sock))
    server.terminate()  # it may wait for its next connection
    _out, err = server.communicate(timeout=30)
    assert code == 97, client_err
    fatal_lines = [line for line in unprefixed(client_err).splitlines() if ": fatal: " in line]
    assert fatal_lines == [
        "s6-tlsc: fatal: unable to check the peer's certificate:"
        " Duplicate 2.5.29.17 extension found (invalid certificate; certificate verify failed)"
    ]
    assert b"alert bad certificate" in err


# --- the peer's certificate in the environment --------------------------------------------


def test_the_application_gets_the_sans_the_spki_and_the_expiry_of_the_peer(ca):
    both = ca.issue(
        "all-kinds",
        "DNS:client.example", "DNS:b.example", "URI:spiffe://example.org/a,b",
        "email:ops@example.org", "IP:192.0.2.7", "IP:2001:db8::7",
    )  # fmt: skip
    leaf_env = {"CERTFILE": both.cert_path, "KEYFILE": both.key_path, "CAFILE": ca.cert_path}
    server = ca.issue("plain-server", "DNS:localhost")
    (code, _out, err), client = direct_pair(
        (["-y"], SERVER_PRINT_ENV, server_env(ca, server)),
        (["-y", "-k", "localhost"], CLIENT_PRINT_ENV, {**os.environ, **leaf_env}),
    )
    assert (code, err) == (0, "")
    _, seen = eval(client[1])
    assert seen["SSL_PEER_CERT_SAN_DNS"] == "client.example,b.example"
    assert seen["SSL_PEER_CERT_SAN_URI"] == "spiffe://example.org/a%2Cb"
    assert seen["SSL_PEER_CERT_SAN_EMAIL"] == "ops@example.org"
    assert seen["SSL_PEER_CERT_SAN_IP"] == "192.0.2.7,2001:db8::7"
    assert seen["SSL_PEER_CERT_SPKI"] == spki(both)
    assert seen["SSL_PEER_CERT_NOT_AFTER"] == both.cert.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert seen["SSL_SESSION_RESUMED"] == "0"


def test_a_comma_in_a_san_and_its_escape_written_out_read_differently(ca):
    """``admin%2Cx.example`` is not ``admin,x.example``: a ``%`` is escaped too."""
    facts = [
        certificate_facts(X509.from_cryptography(ca.issue(stem, f"DNS:{name}").cert))
        for stem, name in (("san-escape", "admin%2Cx.example"), ("san-comma", "admin,x.example"))
    ]
    assert [f["SSL_PEER_CERT_SAN_DNS"] for f in facts] == [
        "admin%252Cx.example",
        "admin%2Cx.example",
    ]


# --- the subject: OpenSSL's one-line form, or refused ---------------------------------------


def name(*attrs: tuple) -> x509.Name:
    out = []
    for oid, value, *kind in attrs:
        extra = {"_type": kind[0]} if kind else {}
        out.append(x509.NameAttribute(oid, value, **extra))
    return x509.Name(out)


BMP = x509.name._ASN1Type.BMPString


@pytest.mark.parametrize(
    "subject",
    [
        name((NameOID.ORGANIZATION_NAME, "Evil/CN=admin"), (NameOID.COMMON_NAME, "mallory")),
        name((NameOID.COMMON_NAME, "Zoë \\ a+b=c,d"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "é", BMP)),
    ],
)
def test_the_subject_is_what_openssl_prints_with_a_backslash_doubled(subject, ca, tmp_path):
    client = ca.issue(f"subject-{abs(hash(subject.rfc4514_string()))}", "DNS:c.example",
                      subject=subject)  # fmt: skip
    env = {**os.environ, "CERTFILE": client.cert_path, "KEYFILE": client.key_path,
           "CAFILE": ca.cert_path}  # fmt: skip
    (code, _out, err), client_result = direct_pair(
        (["-y"], SERVER_PRINT_ENV, server_env(ca, ca.issue("s1", "DNS:localhost"))),
        (["-y", "-k", "localhost"], CLIENT_PRINT_ENV, env),
    )
    assert code == 0, err
    printed = subprocess.run(
        ["openssl", "x509", "-in", client.cert_path, "-noout", "-subject", "-nameopt", "compat"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip().removeprefix("subject=")  # fmt: skip
    _, seen = eval(client_result[1])
    # OpenSSL leaves a backslash alone, which is ambiguous; here it stands between spaces
    assert seen["SSL_PEER_CERT_SUBJECT"] == printed.replace(" \\ ", " \\\\ ")


@pytest.mark.parametrize(
    ("subject", "sans", "reason"),
    [
        (name((NameOID.COMMON_NAME, "mallory\ns6-tlsd: info: forged")), (), "subject"),
        (name((NameOID.COMMON_NAME, "red \x1b[31m")), (), "subject"),
        (name((NameOID.ORGANIZATION_NAME, "a\x00b", BMP)), (), "subject"),
        (None, ("DNS:a\nb.example",), "subjectAltName"),
        (None, ("URI:spiffe://x/\x07",), "subjectAltName"),
    ],
)
def test_a_certificate_with_a_control_character_is_refused_in_the_handshake(
    subject, sans, reason, ca, tmp_path
):
    client = ca.issue("hostile", *sans, subject=subject)
    env = {**os.environ, "CERTFILE": client.cert_path, "KEYFILE": client.key_path,
           "CAFILE": ca.cert_path}  # fmt: skip
    marker = tmp_path / "started"
    (code, _out, err), (_code, _, client_err) = direct_pair(
        (["-y"], touch_then(marker, "true"), server_env(ca, ca.issue("s2", "DNS:localhost"))),
        (["-y", "-k", "localhost"], ["true"], env),
    )
    # Under TLS 1.3 the client has finished its handshake when the server refuses
    # its certificate: the server's verdict is what counts.
    assert code == 97
    assert fatal(err, "s6-tlsd").startswith(f"certificate {reason} holds a control character")
    assert not marker.exists()
    assert all(c == "\n" or " " <= c <= "~" for c in err + client_err)


# --- the server name a client sends ---------------------------------------------------------


def client_hello_with_sni(servername: bytes) -> bytes:
    """A real ClientHello from OpenSSL, its server_name extension replaced by ``servername``."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    conn.set_tlsext_host_name(b"placeholder.example")
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    record = conn.bio_read(65536)
    body = record[9:]
    pos = 34 + 1 + body[34]  # version, random, session id
    pos += 2 + struct.unpack(">H", body[pos : pos + 2])[0]  # cipher suites
    pos += 1 + body[pos]  # compression methods
    head, exts = body[:pos], body[pos + 2 :]
    out = b""
    while exts:
        kind, size = struct.unpack(">HH", exts[:4])
        data = exts[4 : 4 + size]
        if kind == 0:
            entry = b"\x00" + struct.pack(">H", len(servername)) + servername
            data = struct.pack(">H", len(entry)) + entry
        out += struct.pack(">HH", kind, len(data)) + data
        exts = exts[4 + size :]
    body = head + struct.pack(">H", len(out)) + out
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return record[:3] + struct.pack(">H", len(handshake)) + handshake


NOT_A_NAME = "client sent an invalid server name (not labels of printable ASCII)"


@pytest.mark.parametrize(
    ("servername", "reason"),
    [
        (b"x\ns6-tlsd: warning: forged line", NOT_A_NAME),
        (b"red\x1b[31m.example", NOT_A_NAME),
        (b"a" * 300, "bad extension"),  # OpenSSL's own limit, 255 octets, comes first
        (b"a..b", NOT_A_NAME),
        (b"a b.example", NOT_A_NAME),
        (b"a" * 64 + b".example", NOT_A_NAME),
        ("bücher.example".encode(), NOT_A_NAME),
    ],
)
def test_a_server_name_that_is_no_name_gets_unrecognized_name_even_at_k_0(
    servername, reason, ca, leaves, tmp_path
):
    marker = tmp_path / "started"
    server, client = tcp_pair()
    tlsd = spawn_tlsd([], touch_then(marker, "true"), server_env(ca, leaves["server"]), server)
    with client:
        client.sendall(client_hello_with_sni(servername))
        client.settimeout(20)
        answer = client.recv(100)
    code, err = tlsd.wait(timeout=30), tlsd.stderr.read().decode(errors="surrogateescape")
    assert answer[:1] == b"\x15" and answer[5:7] == b"\x02\x70"  # fatal unrecognized_name
    assert code == 97
    assert fatal(err, "s6-tlsd") == reason  # not followed by OpenSSL's "(callback failed)"
    assert all(c == "\n" or " " <= c <= "~" for c in err)
    assert not marker.exists()


@pytest.mark.parametrize(
    "servername", [b"LocalHost", b"localhost.", b"my_host.example", b"-a.example", b"a" * 63]
)
def test_a_name_of_printable_labels_gets_through_at_k_0_which_ignores_it(servername, ca, leaves):
    """Underscores (internal networks, containers) and a final dot are names: never fatal."""
    server, client = tcp_pair()
    tlsd = spawn_tlsd([], ["true"], server_env(ca, leaves["server"]), server)
    with client:
        client.sendall(client_hello_with_sni(servername))
        client.settimeout(20)
        assert client.recv(1) == b"\x16"  # a ServerHello, not an alert
    tlsd.kill()
    tlsd.communicate(timeout=30)


@pytest.mark.parametrize("sent", ["my_host.example", "MY_HOST.example."])
def test_a_name_with_an_underscore_or_a_final_dot_chooses_its_keypair_at_k_1(sent, ca, leaves):
    named = ca.issue("my-host", "DNS:my-host.example")
    env = server_env(
        ca, leaves["server"], **{"CERTFILE:my_host.example": named.cert_path,
                                  "KEYFILE:my_host.example": named.key_path},
    )  # fmt: skip
    with serving(["-k", "1"], SERVER_PRINT_ENV, env) as (_server, port):
        peer = s_client(port, "-servername", sent, "-showcerts", brief=False)
    assert "CN=my-host" in peer.out.decode() or "CN = my-host" in peer.out.decode(), peer.err
    assert f"'SSL_TLS_SNI_SERVERNAME': '{sent}'" in peer.out.decode()


# --- the client's server name: IP literals and international names --------------------------


def test_s6_tlsclient_to_an_ip_checks_the_ip_san(ca, leaves):
    for leaf, expected in ((leaves["server"], 97), (leaves["server_ip"], 0)):
        with serving([], ["true"], server_env(ca, leaf)) as (_server, port):
            res = client_run(port, [], {"CAFILE": ca.cert_path})
        assert res.returncode == expected, res.stderr
        if expected:
            assert b"certificate does not match the server name 127.0.0.1" in res.stderr


def test_an_international_name_is_sent_and_checked_as_its_a_label(ca, leaves):
    with serving([], SERVER_PRINT_ENV, server_env(ca, leaves["server"])) as (_server, port):
        res = subprocess.run(
            [*program("s6-tlsclient"), "-k", "Straße.example", "127.0.0.1", str(port),
             sys.executable, "-c", "import os; print(os.read(6, 65536).decode())"],
            env={**os.environ, "CAFILE": ca.cert_path}, capture_output=True, timeout=30,
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert eval(res.stdout)["SSL_TLS_SNI_SERVERNAME"] == "xn--strae-oqa.example"


def test_a_bad_name_is_refused_before_connecting(ca):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        res = client_run(port, ["-k", "a..b"], {"CAFILE": ca.cert_path})
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), "s6-tlsclient").startswith("invalid server name 'a..b'")

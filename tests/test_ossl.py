"""The OpenSSL binding module: each function against real OpenSSL handshakes."""

import datetime
import subprocess

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from tls_pair import connections, exchange, handshake

from s6tls.tls import ossl as ossl

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")


def server_context(leaf: trustme.LeafCert | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if leaf is not None:
        ctx.use_certificate(_cert(leaf))
        ctx.use_privatekey(_key(leaf))
    return ctx


def _cert(leaf: trustme.LeafCert):
    from cryptography import x509

    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def _key(leaf: trustme.LeafCert):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(leaf.private_key_pem.bytes(), None)


def client_context(ca: trustme.CA | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if ca is not None:
        ctx.get_cert_store().add_cert(X509.from_cryptography(_ca_cert(ca)))
        ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


def _ca_cert(ca: trustme.CA):
    from cryptography import x509

    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def test_groups_are_set_in_order_and_an_unknown_one_is_refused(server_cert):
    assert ossl.has_group("X25519") and ossl.has_group("P-256")
    assert not ossl.has_group("no-such-group")
    server, client = server_context(server_cert), client_context()
    assert ossl.set_groups(server, "P-384")
    assert ossl.set_groups(client, "X25519:P-384")
    assert not ossl.set_groups(client, "X25519:no-such-group")  # the context keeps its list
    s, c = connections(server, client)
    assert handshake(s, c) == (None, None)
    assert c.get_group_name() == s.get_group_name() == "secp384r1"


@pytest.mark.skipif(not ossl.has_group(ossl.HYBRID_GROUP), reason="no hybrid group here")
def test_the_hybrid_post_quantum_group_is_negotiated_when_both_have_it(server_cert):
    server, client = server_context(server_cert), client_context()
    for ctx in (server, client):
        assert ossl.set_groups(ctx, f"{ossl.HYBRID_GROUP}:X25519")
    s, c = connections(server, client)
    assert handshake(s, c) == (None, None)
    assert c.get_group_name() == ossl.HYBRID_GROUP


def psk_pair(server_key: bytes, identity: bytes = b"alice"):
    seen: list[bytes] = []
    server, client = server_context(), client_context()
    ossl.set_psk_server_callback(
        server, lambda conn, i: seen.append(i) or {b"alice": server_key}.get(i)
    )
    ossl.set_psk_client_callback(client, lambda conn: (identity, KEY))
    return server, client, seen


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_psk_handshake_without_certificates(version):
    server, client, seen = psk_pair(KEY)
    for ctx in (server, client):
        ctx.set_max_proto_version(version)
        ctx.set_cipher_list(b"PSK")
    s, c = connections(server, client)
    assert handshake(s, c) == (None, None)
    assert seen == [b"alice"]
    # TLS 1.3 counts an external PSK as a resumption, TLS 1.2 as a PSK suite
    assert ossl.session_reused(s) == (version == SSL.TLS1_3_VERSION)
    assert exchange(c, s, b"ping") == b"ping"


@pytest.mark.parametrize(("key", "identity"), [(b"\xff" * 16, b"alice"), (KEY, b"mallory")])
def test_psk_handshake_fails_with_a_wrong_key_or_identity(key, identity):
    server, client, _seen = psk_pair(key, identity)
    s, c = connections(server, client)
    server_error, client_error = handshake(s, c)
    assert isinstance(server_error, SSL.Error) and isinstance(client_error, SSL.Error)


def test_servername_callback_switches_context_or_refuses_with_unrecognized_name(server_cert, ca):
    other = ca.issue_cert("other.example")
    switched = server_context(other)
    server = server_context(server_cert)
    ossl.set_servername_callback(
        server,
        lambda conn: (
            conn.get_servername() != b"bad.example"
            and (conn.get_servername() != b"other.example" or conn.set_context(switched) or True)
        ),
    )
    for name, leaf in ((b"other.example", other), (b"localhost", server_cert)):
        s, c = connections(server, client_context())
        c.set_tlsext_host_name(name)
        assert handshake(s, c) == (None, None)
        assert c.get_peer_certificate(as_cryptography=True) == _cert(leaf)
    s, c = connections(server, client_context())
    c.set_tlsext_host_name(b"bad.example")
    server_error, client_error = handshake(s, c)
    assert server_error is not None
    assert "unrecognized name" in str(client_error)


def fail(*_args: object) -> int:
    raise ValueError("a check that raises")


@pytest.mark.parametrize(
    ("verify", "alert"),
    [
        (lambda conn, cert, error, depth: error, None),  # OpenSSL's own verdict: trusted
        (lambda conn, cert, error, depth: ossl.CERT_REJECTED * (depth == 0), "bad certificate"),
        (fail, "bad certificate"),  # whatever it raises refuses, never reaches cffi
    ],
)
def test_a_verify_callback_chooses_the_alert_of_its_refusal(verify, alert, server_cert, ca):
    client = client_context(ca)
    ossl.set_verify_callback(client, SSL.VERIFY_PEER, verify)
    s, c = connections(server_context(server_cert), client)
    server_error, client_error = handshake(s, c)
    if alert is None:
        assert (server_error, client_error) == (None, None)
    else:
        assert "certificate verify failed" in str(client_error)
        assert f"alert {alert}" in str(server_error)  # not pyOpenSSL's internal_error


def test_a_serialised_session_resumes_from_another_client_context(server_cert, ca):
    server = server_context(server_cert)
    server.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # tickets only, as s6-tlsserver
    s, c = connections(server, client_context(ca))
    assert handshake(s, c) == (None, None)
    first = ossl.session_to_der(c)
    assert exchange(s, c, b"tickets come with this") == b"tickets come with this"
    der = ossl.session_to_der(c)
    assert der and der != first  # the TLS 1.3 ticket came after the handshake
    assert not ossl.session_reused(c)
    s2, c2 = connections(server, client_context(ca))
    assert ossl.use_session_der(c2, der)
    assert handshake(s2, c2) == (None, None)
    assert ossl.session_reused(c2) and ossl.session_reused(s2)
    s3, c3 = connections(server, client_context(ca))
    assert not ossl.use_session_der(c3, b"not a session")
    assert handshake(s3, c3) == (None, None)
    assert not ossl.session_reused(s3)


def self_signed(*attributes: tuple) -> X509:
    """A self-signed certificate whose subject has ``(oid, value[, ASN.1 type])`` attributes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value, *kind) for oid, value, *kind in attributes])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return X509.from_cryptography(cert)


def test_subject_oneline_is_what_openssl_prints_with_a_backslash_doubled(tmp_path):
    cert = self_signed(
        (NameOID.ORGANIZATION_NAME, "Evil/CN=admin"),
        (NameOID.COMMON_NAME, "mallory é \\ a+b=c,d"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "bmp é", x509.name._ASN1Type.BMPString),
        (NameOID.EMAIL_ADDRESS, "a@b.example"),
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.to_cryptography().public_bytes(Encoding.PEM))
    printed = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "compat"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip().removeprefix("subject=")  # fmt: skip
    ours = ossl.subject_oneline(cert)
    assert ours == printed.replace(" \\ ", " \\\\ ")  # the one backslash, between spaces
    assert ours.startswith("/O=Evil\\/CN=admin/CN=mallory \\xC3\\xA9 \\\\ a\\+b=c,d")


def test_subject_oneline_tells_apart_the_subjects_openssl_prints_alike():
    """``O=a\\`` then ``CN=admin``, or one ``O=a/CN=admin``: OpenSSL prints ``/O=a\\/CN=admin``."""
    two = self_signed((NameOID.ORGANIZATION_NAME, "a\\"), (NameOID.COMMON_NAME, "admin"))
    one = self_signed((NameOID.ORGANIZATION_NAME, "a/CN=admin"))
    assert ossl.subject_oneline(two) == "/O=a\\\\/CN=admin"
    assert ossl.subject_oneline(one) == "/O=a\\/CN=admin"
    text = self_signed((NameOID.COMMON_NAME, "\\x0A"), (x509.ObjectIdentifier("1.2.3.4"), "\n"))
    assert ossl.subject_oneline(text) == "/CN=\\\\x0A/1.2.3.4=\\x0A"  # text, then a byte


def test_verify_error_text_is_openssls():
    assert ossl.verify_error_text(23) == "certificate revoked"
    assert ossl.verify_error_text(12) == "CRL has expired"


def _memory_pair(server_cert, ca):
    leaf = server_cert
    s, c = connections(server_context(leaf), client_context(ca))
    assert handshake(s, c) == (None, None)
    return s, c


def test_pending_output_counts_what_bio_read_would_return(server_cert, ca):
    _server, client = _memory_pair(server_cert, ca)
    assert ossl.pending_output(client) == 0
    with pytest.raises(SSL.WantReadError):
        client.bio_read(1 << 16)
    client.send(b"x" * 1000)
    n = ossl.pending_output(client)
    assert n > 1000
    assert len(client.bio_read(1 << 16)) == n and ossl.pending_output(client) == 0


def test_recv_into_decrypts_into_the_buffer_itself_and_raises_as_pyopenssl(server_cert, ca):
    server, client = _memory_pair(server_cert, ca)
    buf = memoryview(bytearray(100))
    with pytest.raises(SSL.WantReadError):
        ossl.recv_into(server, buf[10:], 50)
    client.send(b"hello, world")
    server.bio_write(client.bio_read(1 << 16))
    assert ossl.recv_into(server, buf[10:], 5) == 5 and bytes(buf[10:15]) == b"hello"
    assert ossl.recv_into(server, buf[10:], 50) == 7 and bytes(buf[10:17]) == b", world"
    client.shutdown()
    server.bio_write(client.bio_read(1 << 16))
    with pytest.raises(SSL.ZeroReturnError):
        ossl.recv_into(server, buf, 50)


class Watcher:
    def __init__(self) -> None:
        self.events: list[tuple[SSL.Connection, int, int]] = []

    def on_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        self.events.append((conn, where, ret))


@pytest.mark.parametrize("alerts_only", [True, False])
def test_watch_info_tells_the_alerts_alone_or_every_event(server_cert, ca, alerts_only):
    server, client = connections(server_context(server_cert), client_context(ca))
    watcher = Watcher()
    ossl.watch_info(server, watcher, alerts_only=alerts_only)
    assert handshake(server, client) == (None, None)
    handshake_events = list(watcher.events)
    assert all(conn is server for conn, _, _ in handshake_events)
    if alerts_only:
        assert handshake_events == []
    else:
        assert any(where & SSL.SSL_CB_HANDSHAKE_DONE for _, where, _ in handshake_events)
    client.shutdown()
    server.bio_write(client.bio_read(1 << 16))
    with pytest.raises(SSL.ZeroReturnError):
        server.recv(10)
    read = SSL.SSL_CB_READ_ALERT
    alerts = [(where, ret) for _, where, ret in watcher.events[len(handshake_events) :]]
    assert (read, 256 * 1 + 0) in [(w & read, r) for w, r in alerts]  # warning close_notify


def test_watch_info_holds_its_watcher_weakly_and_may_change_its_mind(server_cert, ca):
    server, client = connections(server_context(server_cert), client_context(ca))
    gone = Watcher()
    ossl.watch_info(server, gone, alerts_only=False)
    del gone  # the caller keeps the watcher: without it, nothing is called
    kept = Watcher()
    ossl.watch_info(client, kept, alerts_only=True)
    ossl.watch_info(client, kept, alerts_only=False)
    assert handshake(server, client) == (None, None)
    assert kept.events and all(conn is client for conn, _, _ in kept.events)

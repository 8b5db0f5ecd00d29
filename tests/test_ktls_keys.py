"""Kernel TLS keys, checked against published vectors and against OpenSSL itself.

The decisive check: a real handshake between two OpenSSL connections, then
records captured off the wire and decrypted with the keys and sequence
numbers we derived (cryptography's AEADs), for every suite and both
versions, both ways.  The TLS 1.3 server's session tickets come first on its
side: they must be counted, or the data record does not decrypt.
"""

import socket
import struct
import subprocess

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from ktls_helpers import TLS12_CIPHERS, TLS13_SUITES, keys_of, watched, watched_contexts
from OpenSSL import SSL

from s6tls.ktls import keys as ktls_keys
from s6tls.ktls.keys import (
    AES_128_GCM,
    AES_256_GCM,
    CHACHA20_POLY1305,
    DirectionKeys,
    KeysUnavailable,
    Suite,
)


def test_traffic_keys_match_rfc_8448():
    """RFC 8448 section 3: the application traffic keys of the simple 1-RTT handshake."""
    server = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    client = bytes.fromhex("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
    s = ktls_keys.traffic_keys(server, AES_128_GCM)
    c = ktls_keys.traffic_keys(client, AES_128_GCM)
    assert (s.key.hex(), s.iv.hex()) == (
        "9f02283b6c9c07efc26bb9f2ac92e356",
        "cf782b88dd83549aadf1e984",
    )
    assert (c.key.hex(), c.iv.hex()) == (
        "17422dda596ed5d9acd890e3c63f5051",
        "5b78923dee08579033e523d9",
    )


def test_prf_matches_the_published_sha256_vector():
    """The TLS 1.2 PRF test vector circulated on the IETF TLS list (SHA-256, 100 bytes)."""
    out = ktls_keys.tls12_prf(
        bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
        b"test label",
        bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"),
        100,
        hashes.SHA256,
    )
    assert out.hex() == (
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def _openssl_kdf(name: str, length: int, *opts: str) -> bytes:
    """The system OpenSSL's KDF of that name (an implementation independent of ours)."""
    args = ["openssl", "kdf", "-keylen", str(length)]
    for opt in opts:
        args += ["-kdfopt", opt]
    out = subprocess.run([*args, name], capture_output=True, text=True, timeout=30, check=True)
    return bytes.fromhex(out.stdout.strip().replace(":", ""))


@pytest.mark.parametrize("hash_cls", [hashes.SHA256, hashes.SHA384])
def test_prf_agrees_with_openssl(hash_cls):
    secret, seed = bytes(range(48)), bytes(range(100, 164))
    ours = ktls_keys.tls12_prf(secret, b"key expansion", seed, 136, hash_cls)
    theirs = _openssl_kdf(
        "TLS1-PRF",
        136,
        f"digest:{hash_cls.name}",
        f"hexsecret:{secret.hex()}",
        f"hexseed:{(b'key expansion' + seed).hex()}",
    )
    assert ours == theirs
    assert ktls_keys.tls12_prf(secret, b"key expansion", seed[1:], 136, hash_cls) != theirs


@pytest.mark.parametrize("label", [b"key", b"iv", b"traffic upd"])
@pytest.mark.parametrize("suite", [AES_128_GCM, AES_256_GCM])
def test_hkdf_expand_label_agrees_with_openssl(suite, label):
    secret = bytes(range(suite.hash.digest_size))
    ours = ktls_keys.hkdf_expand_label(secret, label, b"", 32, suite.hash)
    theirs = _openssl_kdf(
        "TLS13-KDF",
        32,
        f"digest:{suite.hash.name}",
        "mode:EXPAND_ONLY",
        f"hexkey:{secret.hex()}",
        "prefix:tls13 ",
        f"label:{label.decode()}",
    )
    assert ours == theirs


@pytest.mark.parametrize("suite", [AES_128_GCM, AES_256_GCM])
def test_next_traffic_secret_agrees_with_openssl(suite):
    secret = bytes(range(suite.hash.digest_size))
    size = suite.hash.digest_size
    theirs = _openssl_kdf(
        "TLS13-KDF",
        size,
        f"digest:{suite.hash.name}",
        "mode:EXPAND_ONLY",
        f"hexkey:{secret.hex()}",
        "prefix:tls13 ",
        "label:traffic upd",
    )
    assert ktls_keys.next_traffic_secret(secret, suite) == theirs


@pytest.mark.parametrize(
    ("name", "suite"),
    [
        ("TLS_AES_128_GCM_SHA256", AES_128_GCM),
        ("TLS_AES_256_GCM_SHA384", AES_256_GCM),
        ("TLS_CHACHA20_POLY1305_SHA256", CHACHA20_POLY1305),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", AES_128_GCM),
        ("ECDHE-RSA-AES256-GCM-SHA384", AES_256_GCM),
        ("ECDHE-RSA-CHACHA20-POLY1305", CHACHA20_POLY1305),
        ("ECDHE-RSA-AES128-SHA256", None),
        ("TLS_AES_128_CCM_SHA256", None),
        ("ECDHE-ARIA128-GCM-SHA256", None),
    ],
)
def test_suite_of_openssl_names(name, suite):
    assert ktls_keys.suite_of(name) == suite


@pytest.mark.parametrize(
    ("suite", "size"), [(AES_128_GCM, 40), (AES_256_GCM, 56), (CHACHA20_POLY1305, 56)]
)
@pytest.mark.parametrize("version", [ktls_keys.TLS_1_2_VERSION, ktls_keys.TLS_1_3_VERSION])
def test_crypto_info_has_the_kernel_layout(suite, size, version):
    iv_len = 12 if version == ktls_keys.TLS_1_3_VERSION else suite.fixed_iv_size
    keys = DirectionKeys(bytes([1]) * suite.key_size, bytes(range(2, 2 + iv_len)), 0x0102)
    info = ktls_keys.crypto_info(version, suite, keys)
    assert len(info) == size
    assert struct.unpack("=HH", info[:4]) == (version, suite.cipher_type)
    assert info[-8:] == bytes(6) + b"\x01\x02"  # rec_seq, big-endian
    body = info[4:-8]
    if suite is CHACHA20_POLY1305:
        assert body == keys.iv + keys.key
    elif version == ktls_keys.TLS_1_3_VERSION:
        assert body == keys.iv[4:] + keys.key + keys.iv[:4]
    else:  # the explicit nonce of the next record is its sequence number
        assert body == bytes(6) + b"\x01\x02" + keys.key + keys.iv


# -- against a real OpenSSL connection -----------------------------------


def _handshake(server_ctx, client_ctx):
    a, b = socket.socketpair()
    server, client = watched(SSL.Connection(server_ctx, a)), watched(SSL.Connection(client_ctx, b))
    for sock in (a, b):
        sock.setblocking(False)
    server.set_accept_state()
    client.set_connect_state()
    done: set[int] = set()
    while len(done) < 2:
        for i, conn in enumerate((server, client)):
            try:
                conn.do_handshake()
                done.add(i)
            except SSL.WantReadError:
                pass
    return (server, a), (client, b)


def _records(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Every whole record waiting on ``sock``: (header, body)."""
    data = b""
    while True:
        try:
            data += sock.recv(65536)
        except BlockingIOError:
            break
    out = []
    while data:
        length = struct.unpack("!H", data[3:5])[0]
        out.append((data[:5], data[5 : 5 + length]))
        data = data[5 + length :]
    return out


def _open(suite: Suite, version: int, keys: DirectionKeys, seq: int, header, body):
    """Decrypt one record as the peer would: (content type, cleartext)."""
    aead = AESGCM(keys.key) if suite is not CHACHA20_POLY1305 else ChaCha20Poly1305(keys.key)
    seq_bytes = seq.to_bytes(8, "big")
    if version == ktls_keys.TLS_1_3_VERSION or suite is CHACHA20_POLY1305:
        nonce = bytes(a ^ b for a, b in zip(keys.iv, bytes(4) + seq_bytes, strict=True))
    else:
        nonce, body = keys.iv + body[:8], body[8:]
    if version == ktls_keys.TLS_1_3_VERSION:
        inner = aead.decrypt(nonce, body, header).rstrip(b"\0")
        return inner[-1], inner[:-1]
    aad = seq_bytes + header[:3] + struct.pack("!H", len(body) - 16)
    return header[0], aead.decrypt(nonce, body, aad)


CASES = [(ktls_keys.TLS_1_3_VERSION, s) for s in TLS13_SUITES] + [
    (ktls_keys.TLS_1_2_VERSION, c) for c in TLS12_CIPHERS
]


@pytest.mark.parametrize(("version", "cipher"), CASES)
def test_derived_keys_decrypt_what_openssl_sent(pki, version, cipher):
    (server, ssock), (client, csock) = _handshake(*watched_contexts(pki, version, cipher))
    skeys, ckeys = keys_of(server), keys_of(client)
    assert skeys.version == ckeys.version == version
    suite = skeys.suite
    assert suite == ktls_keys.suite_of(cipher)
    assert (skeys.tx.key, skeys.rx.key) == (ckeys.rx.key, ckeys.tx.key)
    server.send(b"to the client")
    client.send(b"to the server")
    records = _records(csock)
    seen = [_open(suite, version, ckeys.rx, ckeys.rx.seq + i, *r) for i, r in enumerate(records)]
    # TLS 1.3: the server's session tickets (handshake records) come first.
    tickets = [t for t, _ in seen if t == 22]
    assert seen[len(tickets) :] == [(23, b"to the client")]
    if version == ktls_keys.TLS_1_3_VERSION:
        assert len(tickets) == skeys.tx.seq > 0
        assert ckeys.rx.seq == ckeys.tx.seq == skeys.rx.seq == 0
    else:
        assert tickets == [] and {skeys.tx.seq, skeys.rx.seq, ckeys.tx.seq, ckeys.rx.seq} == {1}
    [record] = _records(ssock)
    assert _open(suite, version, skeys.rx, skeys.rx.seq, *record) == (23, b"to the server")
    # The failing twin: one sequence number off and the record does not open.
    with pytest.raises(InvalidTag):
        _open(suite, version, skeys.rx, skeys.rx.seq + 1, *record)


def test_keys_need_the_logged_secrets_and_the_watched_handshake(pki):
    contexts = watched_contexts(pki, ktls_keys.TLS_1_3_VERSION, None, watch=False)
    (server, _), (client, _) = _handshake(*contexts)
    for conn in (server, client):
        with pytest.raises(KeysUnavailable, match="does not log its traffic secrets"):
            keys_of(conn)
    (server, _), _client = _handshake(*watched_contexts(pki, ktls_keys.TLS_1_2_VERSION, None))
    with pytest.raises(KeysUnavailable, match="the handshake was not watched"):
        ktls_keys.connection_keys(server, ktls_keys.HandshakeWatch())


def test_keys_of_a_suite_the_kernel_lacks_are_unavailable(pki):
    contexts = watched_contexts(pki, ktls_keys.TLS_1_3_VERSION, "TLS_AES_128_CCM_SHA256")
    (server, _), _client = _handshake(*contexts)
    with pytest.raises(KeysUnavailable, match=r"TLSv1\.3 TLS_AES_128_CCM_SHA256 is not a suite"):
        keys_of(server)

"""Kernel TLS keys: from a finished OpenSSL handshake to the kernel's structs.

After the handshake, Linux can take over the record layer if it is given, for
each direction, the record key, the IV and the next record sequence number,
in a ``tls12_crypto_info_*`` struct (``linux/tls.h``).  OpenSSL keeps those
to itself, so they are derived here from what it does give:

* TLS 1.3: the application traffic secrets, which OpenSSL hands to the keylog
  callback (``CLIENT_TRAFFIC_SECRET_0``, ``SERVER_TRAFFIC_SECRET_0``), through
  HKDF-Expand-Label (RFC 8446 7.1, 7.3);
* TLS 1.2: the key block, expanded from the master secret and both randoms
  with the PRF (RFC 5246 5 and 6.3).

Sequence numbers: TLS 1.2 starts at 1 both ways (each Finished used 0);
TLS 1.3 at 0, except what the server sent after its Finished: OpenSSL's
session tickets, counted by the info callback.

``watch_context`` installs the keylog callback on a context, before the
context makes its first connection (pyOpenSSL forbids later changes), on
every context a connection may switch to (SNI); a ``HandshakeWatch`` fed by
the connection's info callback sees its role and its tickets.
``connection_keys`` then gives the keys of a connection whose handshake is
done.
"""

import struct
import weakref
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL

# linux/tls.h
TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

_VERSIONS = {"TLSv1.2": TLS_1_2_VERSION, "TLSv1.3": TLS_1_3_VERSION}
_TICKET_STATE = b"SSLv3/TLS write session ticket"


@dataclass(frozen=True)
class Suite:
    """A record protection the kernel takes: its cipher and sizes, and the PRF hash."""

    name: str  # as the -v 2 line shows it
    cipher_type: int  # TLS_CIPHER_*
    key_size: int
    salt_size: int  # the implicit part of the nonce kept apart (AES-GCM), or 0
    iv_size: int  # the rest of the nonce: 8 (AES-GCM) or 12 (ChaCha20-Poly1305)
    hash: type[hashes.HashAlgorithm]

    @property
    def fixed_iv_size(self) -> int:
        """The IV's length in a TLS 1.2 key block (RFC 5288: 4; RFC 7905: 12)."""
        return self.salt_size or self.iv_size


AES_128_GCM = Suite("AES-128-GCM", TLS_CIPHER_AES_GCM_128, 16, 4, 8, hashes.SHA256)
AES_256_GCM = Suite("AES-256-GCM", TLS_CIPHER_AES_GCM_256, 32, 4, 8, hashes.SHA384)
CHACHA20_POLY1305 = Suite(
    "CHACHA20-POLY1305", TLS_CIPHER_CHACHA20_POLY1305, 32, 0, 12, hashes.SHA256
)


def suite_of(cipher_name: str) -> Suite | None:
    """The kernel suite for an OpenSSL cipher name, or None if the kernel has none.

    ``TLS_AES_128_GCM_SHA256`` (TLS 1.3) and ``ECDHE-RSA-AES128-GCM-SHA256``
    (TLS 1.2) are both AES-128-GCM; CBC, CCM or ARIA suites have no kernel
    suite here.
    """
    name = cipher_name.upper().replace("_", "-")
    if "CHACHA20-POLY1305" in name:
        return CHACHA20_POLY1305
    if "AES-128-GCM" in name or "AES128-GCM" in name:
        return AES_128_GCM
    if "AES-256-GCM" in name or "AES256-GCM" in name:
        return AES_256_GCM
    return None


@dataclass(frozen=True)
class DirectionKeys:
    """One direction's record protection: key, the full IV, next sequence number."""

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    seq: int


@dataclass(frozen=True)
class ConnectionKeys:
    """Both directions of a connection, as the kernel needs them."""

    version: int  # TLS_1_2_VERSION or TLS_1_3_VERSION
    suite: Suite
    tx: DirectionKeys  # what we send
    rx: DirectionKeys  # what we receive
    rx_secret: bytes = field(default=b"", repr=False)  # TLS 1.3: the peer's traffic secret
    tx_secret: bytes = field(default=b"", repr=False)  # TLS 1.3: ours


class KeysUnavailable(Exception):
    """The connection's keys cannot be given to the kernel; the text says why."""


# -- TLS 1.3 -------------------------------------------------------------


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_cls: type[hashes.HashAlgorithm]
) -> bytes:
    """HKDF-Expand-Label(secret, label, context, length) of RFC 8446 section 7.1."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + struct.pack("!B", len(context)) + context
    return HKDFExpand(hash_cls(), length, info).derive(secret)


def traffic_keys(secret: bytes, suite: Suite, seq: int = 0) -> DirectionKeys:
    """The record key and IV of a TLS 1.3 traffic secret (RFC 8446 section 7.3)."""
    key = hkdf_expand_label(secret, b"key", b"", suite.key_size, suite.hash)
    iv = hkdf_expand_label(secret, b"iv", b"", 12, suite.hash)
    return DirectionKeys(key, iv, seq)


def next_traffic_secret(secret: bytes, suite: Suite) -> bytes:
    """The traffic secret after a KeyUpdate (RFC 8446 section 7.2)."""
    size = suite.hash.digest_size
    return hkdf_expand_label(secret, b"traffic upd", b"", size, suite.hash)


# -- TLS 1.2 -------------------------------------------------------------


def tls12_prf(
    secret: bytes, label: bytes, seed: bytes, length: int, hash_cls: type[hashes.HashAlgorithm]
) -> bytes:
    """PRF(secret, label, seed) of RFC 5246 section 5: P_hash over HMAC.

    Neither cryptography nor the OpenSSL binding that pyOpenSSL uses exposes
    the TLS 1.2 PRF, so it is composed here from cryptography's HMAC.
    """

    def mac(data: bytes) -> bytes:
        h = hmac.HMAC(secret, hash_cls())
        h.update(data)
        return h.finalize()

    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = mac(a)  # A(i) = HMAC(secret, A(i-1)), A(0) = seed
        out += mac(a + seed)
    return out[:length]


def key_block(
    master: bytes, client_random: bytes, server_random: bytes, suite: Suite
) -> tuple[DirectionKeys, DirectionKeys]:
    """The client's and the server's write keys of TLS 1.2 (RFC 5246 section 6.3).

    AEAD suites have no MAC keys: the block is client key, server key, client
    IV, server IV.  Both sequences start at 1.
    """
    k, i = suite.key_size, suite.fixed_iv_size
    block = tls12_prf(
        master, b"key expansion", server_random + client_random, 2 * (k + i), suite.hash
    )
    client = DirectionKeys(block[:k], block[2 * k : 2 * k + i], 1)
    server = DirectionKeys(block[k : 2 * k], block[2 * k + i :], 1)
    return client, server


# -- the kernel's struct -------------------------------------------------


def crypto_info(version: int, suite: Suite, keys: DirectionKeys) -> bytes:
    """The ``tls12_crypto_info_*`` struct for ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)``.

    Layout: version and cipher (native u16), iv, key, salt, rec_seq
    (big-endian u64).  AES-GCM keeps the nonce's first 4 bytes in ``salt``;
    under TLS 1.2 its ``iv`` is the explicit nonce of the next record, for
    which the record's sequence number is used (RFC 5288 allows any value
    used once).  ChaCha20-Poly1305 has all 12 bytes in ``iv`` and no salt.
    """
    seq = struct.pack("!Q", keys.seq)
    if suite.salt_size:
        salt = keys.iv[: suite.salt_size]
        iv = seq if version == TLS_1_2_VERSION else keys.iv[suite.salt_size :]
    else:
        salt, iv = b"", keys.iv
    assert len(iv) == suite.iv_size and len(keys.key) == suite.key_size
    return struct.pack("=HH", version, suite.cipher_type) + iv + keys.key + salt + seq


# -- what OpenSSL tells us during the handshake --------------------------

_SECRETS: "weakref.WeakKeyDictionary[SSL.Connection, dict[bytes, bytes]]"
_SECRETS = weakref.WeakKeyDictionary()
_TRAFFIC_SECRETS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")


def _on_keylog(conn: SSL.Connection, line: bytes) -> None:
    label, _random, secret = line.split(b" ")
    if label in _TRAFFIC_SECRETS:
        _SECRETS.setdefault(conn, {})[label] = bytes.fromhex(secret.decode("ascii"))


def watch_context(ctx: SSL.Context) -> None:
    """Make ``ctx``'s connections keep their TLS 1.3 traffic secrets for ``connection_keys``.

    Sets the context's keylog callback: call it before ``ctx`` makes any
    connection, on every context a connection may switch to (SNI).
    """
    ctx.set_keylog_callback(_on_keylog)


class HandshakeWatch:
    """What one connection's info callback sees that OpenSSL does not keep.

    Its role (``server``: None until the handshake's first callback), and
    the TLS 1.3 session tickets it wrote after its Finished (each moves the
    sequence number of what it sends).  ``on_info`` must be called from the
    connection's info callback during the handshake (a ``link.Link`` does it
    when its ``handshake_watch`` is set).
    """

    __slots__ = ("server", "tickets")

    def __init__(self) -> None:
        self.server: bool | None = None
        self.tickets = 0

    def on_info(self, conn: SSL.Connection, where: int, _ret: int) -> None:
        if where & (SSL.SSL_ST_ACCEPT | SSL.SSL_ST_CONNECT):
            self.server = bool(where & SSL.SSL_ST_ACCEPT)
        if where & SSL.SSL_CB_LOOP and conn.get_state_string() == _TICKET_STATE:
            self.tickets += 1


def connection_keys(conn: SSL.Connection, watch: HandshakeWatch | None) -> ConnectionKeys:
    """The kernel's view of ``conn``, whose handshake ``watch`` saw; forgets its secrets.

    Raises ``KeysUnavailable`` when what it needs was not seen: the
    handshake not watched (``watch`` None, or it saw no handshake), checked
    first; when the version or the cipher is not one the kernel takes; when
    the traffic secrets were not logged (``watch_context``).
    """
    secrets = _SECRETS.pop(conn, {})
    if watch is None or watch.server is None:
        raise KeysUnavailable("the handshake was not watched")
    version_name = conn.get_protocol_version_name()
    version = _VERSIONS.get(version_name)
    cipher = conn.get_cipher_name() or "none"
    suite = suite_of(cipher)
    if version is None or suite is None:
        raise KeysUnavailable(f"{version_name} {cipher} is not a suite kernel TLS takes")
    if version == TLS_1_2_VERSION:
        randoms = conn.client_random(), conn.server_random()
        client, server = key_block(conn.master_key(), *randoms, suite)
        tx, rx = (server, client) if watch.server else (client, server)
        return ConnectionKeys(version, suite, tx, rx)
    if len(secrets) != 2:
        raise KeysUnavailable("the TLS context does not log its traffic secrets")
    client_secret, server_secret = (secrets[label] for label in _TRAFFIC_SECRETS)
    ours, theirs = (
        (server_secret, client_secret) if watch.server else (client_secret, server_secret)
    )
    return ConnectionKeys(
        version,
        suite,
        traffic_keys(ours, suite, watch.tickets if watch.server else 0),
        traffic_keys(theirs, suite, 0),
        rx_secret=theirs,
        tx_secret=ours,
    )

"""A validated ``TlsConfig`` in, finished pyOpenSSL contexts out.

Contexts are built completely, once per process, before the first
connection (pyOpenSSL forbids changing a context once it made a connection,
and a fork-server shares them with its children).  ``Contexts`` reads the
files through ``credentials`` (a file that cannot be used is a
``ConfigError``, exit 96), builds from memory, and keeps the credentials to
build again with a new session ticket key.

DTLS (``cfg.dtls``): DTLS 1.2 with the same policy where it applies (no
TLS 1.3 suites), the MTU set rather than asked of the socket, and for a
server the cookie callbacks of the stateless exchange (``dtls.cookie``).

The policy: TLS 1.2 and 1.3 only (``TLS_MIN_VERSION``/``TLS_MAX_VERSION``),
the server's order of suites and groups wins, and a value OpenSSL does not
accept in ``TLS_CIPHERS``, ``TLS_CIPHERSUITES`` or ``TLS_GROUPS`` is a
``UsageError`` (100) naming the variable, as is a server's ``TLS_CIPHERS``
that leaves its keys no TLS 1.2 suite (``check_tls12_suites``).

Peer checks run inside the handshake: the chain (with CRLs when
``CRLFILE`` is set) through OpenSSL's own verification, the rest
(``peer.PeerPolicy``: server name, allow-lists, control characters) in the
verify callback, a required OCSP staple in the status callback and the
server name a client sends in the SNI callback.  A refusal sends an alert
(bad_certificate for a certificate the checks refuse; the chain's own for
a chain error) and leaves its reason in the connection's ``VerifyNotes``.
Every callback of ours is ``_guarded``: whatever it raises (a certificate
``cryptography`` cannot parse, say) is a refusal with its reason noted, so
anything a peer sends ends in an alert and exit 97, never in our traceback.
"""

import contextlib
import datetime
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreFlags

from ..dtls.cookie import Cookies
from ..errors import ConfigError, UsageError
from ..net.names import server_name
from . import ossl
from .config import TlsConfig
from .credentials import Credentials, LoadedKeypair, load_credentials
from .peer import PeerPolicy
from .reasons import ssl_error_text
from .sessions import SessionStore

# Safe defaults for every context: no compression, no renegotiation, and a
# bare EOF is not an OpenSSL error (the engine decides).
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF
_SESSION_ID = b"s6tls"
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_DTLS1_2_VERSION = 0xFEFD  # not among pyOpenSSL's names
DEFAULT_GROUPS = "X25519:P-256:P-384"
T = TypeVar("T")
# How long one session ticket key of s6-tlsserver lives at most.
TICKET_KEY_LIFETIME = 12 * 3600.0

Warn = Callable[[str], None]


# What OpenSSL says when a refusal of ours failed the handshake: no more than our reason.
CONSEQUENCES = frozenset(("callback failed", "no shared cipher", "no suitable signature algorithm"))


@dataclass
class VerifyNotes:
    """What one connection's callbacks learnt; kept as the connection's app data.

    ``reasons``: why a check refused the peer, first one first.
    ``psk_identity``: the PSK identity the handshake used, if any.
    ``psk_offered``: the first PSK identity a client offered a server.
    ``psk_only``: a server whose only credential is PSKFILE.
    """

    reasons: list[str] = field(default_factory=list)
    psk_identity: str | None = None
    sessions: SessionStore | None = None  # a client with TLS_SESSION_DIR
    psk_offered: str | None = None
    psk_only: bool = False

    def refusal(self, openssl: str) -> str | None:
        """The line for a handshake that failed with OpenSSL's ``openssl``; None: that one.

        Our reason, when a check of ours refused the peer or a PSK-only
        server got no PSK it knows; OpenSSL's text follows in brackets only
        where it adds to it, not where it is what our refusal made OpenSSL
        say (``CONSEQUENCES``) or what our reason already says.
        """
        reason = self.reasons[0] if self.reasons else None
        if reason is None and self.psk_only and self.psk_identity is None:
            reason = (
                "client offered no PSK, and PSKFILE is all this server has"
                if self.psk_offered is None
                else f"client offered PSK identity {self.psk_offered}, which is not in PSKFILE"
            )
        if reason is None or openssl in reason or openssl in CONSEQUENCES:
            return reason
        return f"{reason} ({openssl})"


@functools.cache
def default_groups() -> str:
    """The hybrid post-quantum group first where this OpenSSL has it, then X25519, P-256, P-384.

    Probed once per process: the OpenSSL in use does not change.
    """
    if ossl.has_group(ossl.HYBRID_GROUP):
        return f"{ossl.HYBRID_GROUP}:{DEFAULT_GROUPS}"
    return DEFAULT_GROUPS


class Contexts:
    """The context of one process, from credentials read once.

    A server that ``tickets`` (s6-tlsserver) keeps one session ticket key in
    its context, which every child inherits through fork, so any child
    resumes a session another one started.  ``reload`` (SIGHUP) reads the
    files again and builds a new context, with a new key; ``rotate_if_due``
    builds a new context from the credentials in memory once the key is
    ``TICKET_KEY_LIFETIME`` seconds old.  The caller forks no child with a
    context older than the last of these calls.

    The warnings about the files (an expired certificate, a key others can
    read) go to ``warn``, at start and at each reload.

    Raises ``ConfigError`` (96) if a file cannot be used, ``UsageError``
    (100) if OpenSSL refuses a policy value.
    """

    def __init__(self, cfg: TlsConfig, warn: Warn | None = None, *, tickets: bool = False) -> None:
        self.cfg = cfg
        self.warn = warn
        self.tickets = tickets
        self._install(self._load())

    def _load(self) -> Credentials:
        creds = load_credentials(self.cfg)
        for line in creds.warnings:
            if self.warn is not None:
                self.warn(line)
        return creds

    def _install(self, creds: Credentials) -> None:
        """Build the context from ``creds`` and make it current; on error keep the old one."""
        context = make_context(self.cfg, creds, tickets=self.tickets)
        if self.cfg.role == "server" and (self.cfg.dtls or self.cfg.min_version == "1.2"):
            check_tls12_suites(self.cfg, context, creds)
        self.creds, self.context, self.born = creds, context, time.monotonic()

    def reload(self) -> None:
        """Read the files again and build a new context, or raise and keep the old one."""
        self._install(self._load())

    def seconds_to_rotation(self) -> float:
        """How long until the ticket key must be replaced (0 when it is due)."""
        return max(0.0, self.born + TICKET_KEY_LIFETIME - time.monotonic())

    def rotate_if_due(self) -> bool:
        """Replace the ticket key if it is old enough; True if it was replaced."""
        if not self.tickets or self.seconds_to_rotation() > 0:
            return False
        self._install(self.creds)
        return True


def build_context(
    cfg: TlsConfig, warn: Warn | None = None, *, tickets: bool = False
) -> SSL.Context:
    """The context for ``cfg``'s role, with SNI contexts attached for a server.

    One ``Contexts(cfg, warn, tickets=tickets).context``: every file read once.
    """
    return Contexts(cfg, warn, tickets=tickets).context


def make_context(cfg: TlsConfig, creds: Credentials, *, tickets: bool = False) -> SSL.Context:
    """The context from credentials already read: opens no file.

    Each call makes a new session ticket key.  ``tickets``: a server issues
    TLS 1.2 session tickets (TLS 1.3 ones: see ``config.no_tickets_conf``).
    """
    if cfg.role == "client":
        ctx = _base_context(cfg, creds)
        if creds.keypair:  # read only with -y
            _use_keypair(ctx, creds.keypair)
        return ctx
    named = {}
    for name, pair in creds.sni:
        sub = _base_context(cfg, creds)
        _use_keypair(sub, pair)
        named[name] = sub
    ctx = _base_context(cfg, creds)
    if cfg.dtls:
        Cookies().install(ctx)
    if not tickets:
        ctx.set_options(SSL.OP_NO_TICKET)
    if creds.keypair:
        _use_keypair(ctx, creds.keypair)
        if creds.ocsp:
            ctx.set_ocsp_server_callback(_staple, creds.ocsp)
    has_default = creds.keypair is not None or bool(creds.psks)
    switch = _sni_switcher(named, has_default)
    ossl.set_servername_callback(ctx, _guarded("check the server name", switch, False))
    return ctx


def check_tls12_suites(cfg: TlsConfig, ctx: SSL.Context, creds: Credentials) -> None:
    """Refuse a TLS_CIPHERS that leaves a server's keys no TLS 1.2 suite to serve with.

    OpenSSL takes a cipher string as long as it names suites, then refuses
    every TLS 1.2 client with "no shared cipher" when none of them fits the
    keys (``eNULL``; RSA suites and an ECDSA key; certificate suites and
    PSKFILE alone).  So a client offering every suite (and the server's
    first PSK) sends its ClientHello to ``ctx``, in memory, once per kind of
    key the server has (the default keypair, the SNI ones); an alert instead
    of a ServerHello is a refusal.  ``ctx`` is finished: it makes a connection.

    Raises ``UsageError`` (100) naming TLS_CIPHERS and the keypair.
    """
    probes: dict[object, tuple[str | None, str]] = {}
    if creds.keypair is not None and cfg.keypair is not None:
        probes[type(creds.keypair.key)] = (None, f"CERTFILE {cfg.keypair.certfile}")
    elif creds.psks:
        probes[None] = (None, f"PSKFILE {cfg.pskfile}")
    for name, pair in creds.sni:
        probes.setdefault(type(pair.key), (name.replace("*", "probe", 1), f"CERTFILE:{name}"))
    or_later = "" if cfg.dtls else ", or set TLS_MIN_VERSION=1.3"
    for servername, what in probes.values():
        if not _serves_tls12(ctx, servername, creds.psks[:1], dtls=cfg.dtls):
            raise UsageError(
                f"invalid TLS_CIPHERS: none of its TLS 1.2 suites can be used with {what}:"
                f" give suites for its key{or_later}"
            )


def _serves_tls12(
    ctx: SSL.Context, servername: str | None, psks: tuple[tuple[bytes, bytes], ...], *, dtls: bool
) -> bool:
    """True if ``ctx`` answers a TLS 1.2 ClientHello offering every suite with a ServerHello."""
    probe = SSL.Context(SSL.DTLS_METHOD if dtls else SSL.TLS_METHOD)
    probe.set_max_proto_version(_DTLS1_2_VERSION if dtls else SSL.TLS1_2_VERSION)
    probe.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    if psks:
        ossl.set_psk_client_callback(probe, lambda _conn: psks[0])
    client, server = SSL.Connection(probe, None), SSL.Connection(ctx, None)
    client.set_connect_state()
    if servername:
        client.set_tlsext_host_name(servername.encode("ascii"))
    server.set_accept_state()
    with contextlib.suppress(SSL.WantReadError):
        client.do_handshake()  # writes the ClientHello, then waits
    server.bio_write(client.bio_read(65536))
    with contextlib.suppress(SSL.Error):
        server.do_handshake()  # a ServerHello, or an alert
    try:
        answer = server.bio_read(65536)
    except SSL.WantReadError:
        answer = b""
    return answer[:1] != b"\x15"  # an alert record


def _base_context(cfg: TlsConfig, creds: Credentials) -> SSL.Context:
    if cfg.dtls:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_min_proto_version(_DTLS1_2_VERSION)
        ctx.set_max_proto_version(_DTLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_QUERY_MTU)  # a socket BIO cannot tell it: DTLS_MTU does
    else:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(_VERSIONS[cfg.min_version])
        ctx.set_max_proto_version(_VERSIONS[cfg.max_version])
    ctx.set_options(_OPTIONS)
    if cfg.role == "server":
        ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.set_session_id(_SESSION_ID)  # a client's would make OpenSSL refuse its PSK
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # tickets only: processes share no cache
    _set_policy(ctx, cfg)
    _set_verification(ctx, cfg, creds)
    if cfg.alpn:
        _set_alpn(ctx, cfg)
    if creds.psks:
        _set_psk(ctx, cfg, creds)
    if cfg.options.ktls:
        from ..ktls.keys import watch_context  # only then: its imports cost start-up time

        watch_context(ctx)  # kernel TLS needs the TLS 1.3 traffic secrets
    return ctx


def _set_policy(ctx: SSL.Context, cfg: TlsConfig) -> None:
    """Suites and groups; OpenSSL's refusal is the user's usage error."""
    try:
        ctx.set_cipher_list(cfg.ciphers.encode())
    except SSL.Error:
        raise UsageError(
            f"invalid TLS_CIPHERS: OpenSSL accepts no cipher in {cfg.ciphers!r}"
        ) from None
    suites = None if cfg.dtls else cfg.ciphersuites
    if suites is None and cfg.pskfile and cfg.role == "server" and not cfg.dtls:
        # An external PSK needs a SHA-256 suite, and the server's order wins.
        suites = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
    if suites is not None:
        try:
            ctx.set_tls13_ciphersuites(suites.encode())
        except SSL.Error:
            raise UsageError(f"invalid TLS_CIPHERSUITES: OpenSSL refuses {suites!r}") from None
    groups = cfg.groups or default_groups()
    if not ossl.set_groups(ctx, groups):
        raise UsageError(f"invalid TLS_GROUPS: OpenSSL refuses {groups!r}")


def _set_verification(ctx: SSL.Context, cfg: TlsConfig, creds: Credentials) -> None:
    """Trust anchors, CRLs and the verify callback, as the role and options ask.

    A client always verifies with the callback, so that the strings of the
    server's certificate are checked even under --no-verify-cert, which only
    stops the chain (and name) from being checked.
    """
    check_chain = cfg.verify_peer != "none"
    if cfg.role == "server" and not check_chain:
        return
    if check_chain:
        _load_trust(ctx, cfg, creds)
    name = cfg.servername if cfg.role == "client" and check_chain else None
    policy = PeerPolicy(
        name=name,
        dns=cfg.peer_dns,
        uri=cfg.peer_uri,
        email=cfg.peer_email,
        ip=cfg.peer_ip,
        spki=cfg.peer_spki,
    )
    mode = SSL.VERIFY_PEER
    if cfg.role == "server" and cfg.verify_peer == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ossl.set_verify_callback(ctx, mode, _verify_callback(policy, check_chain))
    if cfg.ocsp == "require":
        ctx.set_ocsp_client_callback(_guarded("check the OCSP response", _staple_checker(), False))


def _load_trust(ctx: SSL.Context, cfg: TlsConfig, creds: Credentials) -> None:
    if cfg.cadir:
        if not os.access(cfg.cadir, os.R_OK | os.X_OK):
            raise ConfigError(f"unable to read CADIR {cfg.cadir}: not a readable directory")
        try:
            ctx.load_verify_locations(None, cfg.cadir)
        except SSL.Error as exc:
            reason = ssl_error_text(exc)
            raise ConfigError(f"unable to use CADIR {cfg.cadir}: {reason}") from None
    store = ctx.get_cert_store()
    assert store is not None
    for ca in creds.cas:
        store.add_cert(X509.from_cryptography(ca))
        if cfg.role == "server":
            ctx.add_client_ca(ca)
    if creds.crls:
        for crl in creds.crls:
            store.add_crl(crl)
        flags = X509StoreFlags.CRL_CHECK
        if cfg.crl_check == "chain":
            flags |= X509StoreFlags.CRL_CHECK_ALL
        store.set_flags(flags)


def _use_keypair(ctx: SSL.Context, pair: LoadedKeypair) -> None:
    ctx.use_certificate(pair.chain[0])
    for cert in pair.chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(pair.key)


def _set_alpn(ctx: SSL.Context, cfg: TlsConfig) -> None:
    protocols = [p.encode("ascii") for p in cfg.alpn]
    if cfg.role == "client":
        ctx.set_alpn_protos(protocols)
        return

    def select(conn: SSL.Connection, offered: list[bytes]) -> bytes | None:
        chosen = next((protocol for protocol in protocols if protocol in offered), None)
        if chosen is None:
            _note(conn, f"no application protocol in common (TLS_ALPN {','.join(cfg.alpn)})")
        return chosen

    choose = _guarded("choose an application protocol", select, None)

    def alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
        chosen = choose(conn, offered)
        if chosen is None:  # pyOpenSSL answers an exception with no_application_protocol
            raise SSL.Error(_notes(conn).reasons[-1])
        return chosen

    ctx.set_alpn_select_callback(alpn)


def _set_psk(ctx: SSL.Context, cfg: TlsConfig, creds: Credentials) -> None:
    keys = dict(creds.psks)
    if cfg.role == "client":
        identity = cfg.psk_identity.encode() if cfg.psk_identity else creds.psks[0][0]

        def choose(conn: SSL.Connection) -> tuple[bytes, bytes]:
            _notes(conn).psk_identity = identity.decode("ascii")
            return identity, keys[identity]

        ossl.set_psk_client_callback(ctx, _guarded("choose a PSK", choose, None))
        return

    def lookup(conn: SSL.Connection, identity: bytes) -> bytes | None:
        # Also called with a session ticket's identity, which no line matches.
        notes = _notes(conn)
        if notes.psk_offered is None:
            notes.psk_offered = identity.decode("ascii", "replace")
        key = keys.get(identity)
        if key is not None:
            notes.psk_identity = identity.decode("ascii")
        return key

    ossl.set_psk_server_callback(ctx, _guarded("look up the PSK identity", lookup, None))


def _notes(conn: SSL.Connection) -> VerifyNotes:
    """The connection's notes (``prepare_connection`` attached them)."""
    notes = conn.get_app_data()
    if not isinstance(notes, VerifyNotes):
        notes = VerifyNotes()
        conn.set_app_data(notes)
    return notes


def _note(conn: SSL.Connection, reason: str) -> None:
    _notes(conn).reasons.append(reason)


def _guarded(what: str, callback: Callable[..., T], refusal: T) -> Callable[..., T]:
    """``callback`` (a handshake callback whose first argument is the connection), made safe.

    Whatever it raises refuses the handshake: ``unable to WHAT: why`` goes
    to the connection's notes and ``refusal`` back to OpenSSL, which sends
    its alert.  What a peer sends can then fail a handshake (97), never the
    program (111).
    """

    def guarded(conn: SSL.Connection, *args: Any) -> T:
        try:
            return callback(conn, *args)
        except Exception as exc:
            _note(conn, f"unable to {what}: {str(exc) or type(exc).__name__}")
            return refusal

    return guarded


def sni_lookup(names: dict[str, SSL.Context], servername: str) -> SSL.Context | None:
    """The context for ``servername``: an exact match, else ``*.`` + its parent.

    ``servername`` is as ``names.server_name`` gives it (lower case, no
    final dot).  A wildcard stands for exactly one label, as in certificates.
    """
    if servername in names:
        return names[servername]
    _label, dot, parent = servername.partition(".")
    return names.get("*." + parent) if dot and parent else None


def _sni_switcher(
    names: dict[str, SSL.Context], has_default: bool
) -> Callable[[SSL.Connection], bool]:
    """The SNI callback: refuse a name that is no name, switch to the name's keypair.

    A server name that ``names.server_name`` refuses (a control character,
    a byte outside ASCII, an empty label) is refused with the
    ``unrecognized_name`` alert, whatever the SNI level, since the
    application and the log would see it.  Any other name is looked up in
    ``names`` (empty at -k 0, which chooses nothing by name).  Without a
    default keypair (-k 2) and no match, the handshake will fail for want of
    a certificate; the reason names the server name, not only OpenSSL's "no
    suitable signature algorithm".
    """

    def switch(conn: SSL.Connection) -> bool:
        raw = conn.get_servername()
        name = server_name(raw) if raw else ""
        if name is None:
            _note(conn, "client sent an invalid server name (not labels of printable ASCII)")
            return False
        sub = sni_lookup(names, name) if name else None
        if sub is not None:
            conn.set_context(sub)
        elif not has_default:
            why = f"no keypair for server name {name}" if name else "client sent no server name"
            _note(conn, f"{why} under -k 2")
        return True

    return switch


def _verify_callback(
    policy: PeerPolicy, check_chain: bool
) -> Callable[[SSL.Connection, X509, int, int], int]:
    """OpenSSL's chain verdict (unless ``check_chain`` is off), then ``policy`` at depth 0.

    For ``ossl.set_verify_callback``: a chain error keeps OpenSSL's code (and
    alert), a certificate ``policy`` refuses gets bad_certificate.
    """

    def verify(conn: SSL.Connection, cert: X509, error: int, depth: int) -> int:
        if error and check_chain:
            text = ossl.verify_error_text(error)
            _note(conn, f"certificate verify failed at depth {depth}: {text}")
            return error
        if depth == 0:
            reason = policy.check(cert)
            if reason:
                _note(conn, reason)
                return ossl.CERT_REJECTED
        return 0

    return _guarded("check the peer's certificate", verify, ossl.CERT_REJECTED)


def _staple(_conn: SSL.Connection, response: bytes) -> bytes:
    """The server's OCSP callback: the response read from OCSPFILE."""
    return response


def _staple_checker() -> Callable[[SSL.Connection, bytes, object], bool]:
    """TLS_OCSP=require's callback: a good, current response for the server's certificate.

    ``ocsp`` is imported here, as the context is built (before any privilege
    drop), and only then: the callback runs mid-handshake, where no import
    may happen.
    """
    from .ocsp import check_stapled

    def check(conn: SSL.Connection, response: bytes, _data: object) -> bool:
        if ossl.session_reused(conn):
            return True  # checked in the handshake that made the session
        chain = conn.get_verified_chain(as_cryptography=True) or []
        if len(chain) < 2:
            reason: str | None = "no issuer to check the OCSP response against"
        else:
            now = datetime.datetime.now(datetime.UTC)
            reason = check_stapled(response, chain[0], chain[1], now)
        if reason:
            _note(conn, reason)
            return False
        return True

    return check


def prepare_connection(cfg: TlsConfig, conn: SSL.Connection) -> VerifyNotes:
    """Set up ``conn`` (the ``conn`` of a ``link.new_link``) for its handshake; return its notes.

    A client sends its server name as SNI (unless it is an IP literal),
    asks for an OCSP staple under TLS_OCSP=require, and offers the session
    kept in TLS_SESSION_DIR; then the connection is put in connect or accept
    state.
    """
    notes = VerifyNotes()
    conn.set_app_data(notes)
    if cfg.role == "server":
        notes.psk_only = bool(cfg.pskfile) and cfg.keypair is None and not cfg.sni_keypairs
        conn.set_accept_state()
        return notes
    if cfg.servername and not cfg.servername_is_ip:
        conn.set_tlsext_host_name(cfg.servername.encode("ascii"))
    if cfg.ocsp == "require":
        conn.request_ocsp()
    if cfg.session_dir and cfg.servername and not cfg.pskfile:
        notes.sessions = SessionStore.for_config(cfg)
        notes.sessions.attach(conn)
    conn.set_connect_state()
    return notes


def keep_session(conn: SSL.Connection, warn: Warn) -> None:
    """After a connection that ended well: a client under TLS_SESSION_DIR keeps its session.

    Why it could not, if it could not, goes to ``warn``.
    """
    notes = conn.get_app_data()
    if isinstance(notes, VerifyNotes) and notes.sessions is not None:
        problem = notes.sessions.keep(conn)
        if problem:
            warn(problem)

"""The OpenSSL functions pyOpenSSL does not wrap, through the binding it uses itself.

pyOpenSSL runs on the OpenSSL that cryptography bundles, and exposes that
library's cffi binding as ``OpenSSL._util.lib``/``ffi``.  This module is the
only place that calls it, for what pyOpenSSL has no method for: key-exchange
groups, PSK callbacks, a server-name callback that can refuse a name with an
alert, a verify callback that chooses its alert, session (de)serialisation
and reuse, the one-line form of a name, the text of a verification error,
and, for the engine's hot path, decryption straight into a buffer, the
size of a memory BIO, and one info callback for every connection.
Nothing here loads a second copy of libssl.

Every callback handed to OpenSSL is kept alive on the pyOpenSSL object it
belongs to (the info callbacks: for the whole process), and never lets a
Python exception reach cffi: it answers OpenSSL with the failure value
instead (an info callback has none: it ignores it).
"""

import weakref
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi, lib
from OpenSSL.crypto import X509

# RFC 8446 alert numbers OpenSSL takes from a server-name callback.
ALERT_UNRECOGNIZED_NAME = 112
# The verdict of a verify callback that refuses a certificate: OpenSSL answers
# X509_V_ERR_CERT_REJECTED with the bad_certificate alert.
CERT_REJECTED: int = lib.X509_V_ERR_CERT_REJECTED
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2

# The hybrid post-quantum key exchange, where the OpenSSL in use has it.
HYBRID_GROUP = "X25519MLKEM768"


class InfoWatcher(Protocol):
    """What ``watch_info`` calls: ``on_info(conn, where, ret)`` as an info callback would be."""

    def on_info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        """One of ``conn``'s info events (``SSL.SSL_CB_*`` flags in ``where``)."""


# The connections watch_info watches: their SSL pointer -> their watcher, held weakly.
_watchers: "weakref.WeakValueDictionary[Any, InfoWatcher]" = weakref.WeakValueDictionary()


def _on_info(ssl: object, where: int, ret: int) -> None:
    watcher = _watchers.get(ssl)
    if watcher is not None:
        watcher.on_info(SSL.Connection._reverse_mapping[ssl], where, ret)


def _on_alert(ssl: object, where: int, ret: int) -> None:
    if where & SSL.SSL_CB_ALERT:
        _on_info(ssl, where, ret)


def _ignore(*_exc: object) -> None:
    return None


# Made once: pyOpenSSL's set_info_callback makes a cffi callback per connection.
_EVERY_EVENT = ffi.callback("void (*)(const SSL *, int, int)", _on_info, onerror=_ignore)
_ALERTS = ffi.callback("void (*)(const SSL *, int, int)", _on_alert, onerror=_ignore)


def watch_info(conn: SSL.Connection, watcher: InfoWatcher, *, alerts_only: bool) -> None:
    """Call ``watcher.on_info(conn, where, ret)`` at ``conn``'s info events.

    Every event, or with ``alerts_only`` those of the alerts read and
    written (``SSL_CB_ALERT``): the handshake's many events then cost no
    Python call.  Call again to change that.  ``watcher`` is held weakly
    (the caller keeps it as long as ``conn``), so it may hold no reference
    to ``conn``'s owner without making a cycle.  One callback serves every
    connection: nothing is made per connection but the watcher's entry.
    """
    _watchers[conn._ssl] = watcher
    lib.SSL_set_info_callback(conn._ssl, _ALERTS if alerts_only else _EVERY_EVENT)


def _keep(owner: object, callback: object) -> None:
    """Tie a cffi callback's lifetime to ``owner`` (a Context)."""
    kept = owner.__dict__.setdefault("_s6tls_callbacks", [])
    kept.append(callback)


def set_groups(ctx: SSL.Context, groups: str) -> bool:
    """Set the key-exchange groups (``:``-separated, preference order).

    Returns False, leaving the context as it was, if OpenSSL rejects the
    list (an unknown group, say).
    """
    ok = lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) == 1
    lib.ERR_clear_error()
    return ok


def has_group(name: str) -> bool:
    """True if the OpenSSL in use knows the key-exchange group ``name``."""
    return set_groups(SSL.Context(SSL.TLS_METHOD), name)


def set_servername_callback(ctx: SSL.Context, accept: Callable[[SSL.Connection], bool]) -> None:
    """Call ``accept(conn)`` when a ClientHello arrives; False refuses the handshake.

    Unlike pyOpenSSL's own setter, a refusal sends the ``unrecognized_name``
    alert and prints nothing.  ``accept`` may switch the connection's context
    (``conn.set_context``).  An exception in ``accept`` counts as a refusal.
    """

    def callback(ssl: object, alert: object, _arg: object) -> int:
        try:
            ok = accept(SSL.Connection._reverse_mapping[ssl])
        except Exception:
            ok = False
        if ok:
            return _SSL_TLSEXT_ERR_OK
        alert[0] = ALERT_UNRECOGNIZED_NAME  # type: ignore[index]
        return _SSL_TLSEXT_ERR_ALERT_FATAL

    cb = ffi.callback("int (*)(SSL *, int *, void *)", callback, onerror=_refuse_name)
    _keep(ctx, cb)
    lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, cb)


def _refuse_name(*_exc: object) -> int:
    return _SSL_TLSEXT_ERR_ALERT_FATAL


def set_verify_callback(
    ctx: SSL.Context, mode: int, verify: Callable[[SSL.Connection, X509, int, int], int]
) -> None:
    """Check the peer's chain with ``verify(conn, cert, error, depth)``, at each certificate.

    ``error`` is OpenSSL's verdict on ``cert``: 0 (``X509_V_OK``) or an
    ``X509_V_ERR_*`` code.  ``verify`` returns the verdict to keep: 0 accepts
    the certificate, a code refuses the handshake with OpenSSL's alert for
    that code (``CERT_REJECTED``: bad_certificate; a chain error keeps its
    own: unknown_ca, certificate_expired...).  pyOpenSSL's ``set_verify``
    cannot choose: OpenSSL 3 answers its refusals with internal_error.  An
    exception in ``verify`` refuses with ``CERT_REJECTED``.  ``mode``:
    ``SSL.VERIFY_*`` flags.
    """

    def callback(ok: int, store: object) -> int:
        try:
            x509 = lib.X509_STORE_CTX_get_current_cert(store)
            lib.X509_up_ref(x509)
            cert = X509._from_raw_x509_ptr(x509)
            ssl = lib.X509_STORE_CTX_get_ex_data(store, lib.SSL_get_ex_data_X509_STORE_CTX_idx())
            error = 0 if ok else lib.X509_STORE_CTX_get_error(store)
            depth = lib.X509_STORE_CTX_get_error_depth(store)
            verdict = verify(SSL.Connection._reverse_mapping[ssl], cert, error, depth)
        except Exception:
            verdict = CERT_REJECTED
        lib.X509_STORE_CTX_set_error(store, verdict)
        return 0 if verdict else 1

    cb = ffi.callback("int (*)(int, X509_STORE_CTX *)", callback, onerror=_zero)
    _keep(ctx, cb)
    lib.SSL_CTX_set_verify(ctx._context, mode, cb)


def set_psk_server_callback(
    ctx: SSL.Context, lookup: Callable[[SSL.Connection, bytes], bytes | None]
) -> None:
    """Accept PSK handshakes: ``lookup(conn, identity)`` gives the key, or None.

    OpenSSL uses these keys for TLS 1.2 PSK suites and, as external PSKs
    with SHA-256, for TLS 1.3.
    """

    def callback(ssl: object, identity: object, psk: object, max_len: int) -> int:
        try:
            conn = SSL.Connection._reverse_mapping[ssl]
            key = lookup(conn, ffi.string(identity))
        except Exception:
            return 0
        if key is None or len(key) > max_len:
            return 0
        ffi.memmove(psk, key, len(key))
        return len(key)

    cb = ffi.callback(
        "unsigned int (*)(SSL *, char *, unsigned char *, unsigned int)", callback, onerror=_zero
    )
    _keep(ctx, cb)
    lib.SSL_CTX_set_psk_server_callback(ctx._context, cb)


def set_psk_client_callback(
    ctx: SSL.Context, choose: Callable[[SSL.Connection], tuple[bytes, bytes] | None]
) -> None:
    """Offer a PSK in every handshake: ``choose(conn)`` gives (identity, key), or None."""

    def callback(
        ssl: object, _hint: object, id_out: object, max_id: int, psk: object, max_psk: int
    ) -> int:
        try:
            chosen = choose(SSL.Connection._reverse_mapping[ssl])
        except Exception:
            return 0
        if chosen is None:
            return 0
        identity, key = chosen
        if len(identity) > max_id or len(key) > max_psk:
            return 0
        ffi.memmove(id_out, identity + b"\0", len(identity) + 1)
        ffi.memmove(psk, key, len(key))
        return len(key)

    cb = ffi.callback(
        "unsigned int (*)(SSL *, char *, char *, unsigned int, unsigned char *, unsigned int)",
        callback,
        onerror=_zero,
    )
    _keep(ctx, cb)
    lib.SSL_CTX_set_psk_client_callback(ctx._context, cb)


def _zero(*_exc: object) -> int:
    return 0


def session_reused(conn: SSL.Connection) -> bool:
    """True if the handshake of ``conn`` resumed a session."""
    return lib.SSL_session_reused(conn._ssl) == 1


def session_to_der(conn: SSL.Connection) -> bytes | None:
    """The connection's current session in OpenSSL's DER form, or None."""
    session = lib.SSL_get_session(conn._ssl)
    if session == ffi.NULL:
        return None
    size = lib.i2d_SSL_SESSION(session, ffi.NULL)
    if size <= 0:
        return None
    buf = ffi.new("unsigned char[]", size)
    lib.i2d_SSL_SESSION(session, ffi.new("unsigned char **", buf))
    return ffi.buffer(buf, size)[:]


def use_session_der(conn: SSL.Connection, der: bytes) -> bool:
    """Offer the session in ``der`` (from ``session_to_der``) in the next handshake.

    Returns False, changing nothing, if ``der`` is not a session OpenSSL
    can read.
    """
    buf = ffi.new("unsigned char[]", der)
    session = lib.d2i_SSL_SESSION(ffi.NULL, ffi.new("unsigned char **", buf), len(der))
    if session == ffi.NULL:
        lib.ERR_clear_error()
        return False
    try:
        return lib.SSL_set_session(conn._ssl, session) == 1
    finally:
        lib.SSL_SESSION_free(session)  # SSL_set_session took its own reference


def subject_oneline(cert: X509) -> str:
    r"""The certificate's subject in OpenSSL's one-line form, made unambiguous.

    ``/label=value`` for each entry, as ``X509_NAME_oneline`` writes it: the
    label is OpenSSL's short name (``CN``, ``emailAddress``) or the OID; in
    a value, ``/`` and ``+`` are ``\/`` and ``\+``, bytes outside printable
    ASCII ``\xHH``; each value is its bytes as the certificate encodes them.
    Unlike OpenSSL, a backslash in a value is ``\\``, so that no two
    subjects read the same: ``O=a\`` then ``CN=admin`` is
    ``/O=a\\/CN=admin``, one ``O=a/CN=admin`` is ``/O=a\/CN=admin``.
    """
    name = lib.X509_get_subject_name(cert._x509)
    labels: list[str | None] = []
    values = []
    for i in range(lib.X509_NAME_entry_count(name)):
        entry = lib.X509_NAME_get_entry(name, i)
        nid = lib.OBJ_obj2nid(lib.X509_NAME_ENTRY_get_object(entry))
        short = lib.OBJ_nid2sn(nid) if nid != lib.NID_undef else ffi.NULL
        labels.append(ffi.string(short).decode("ascii") if short != ffi.NULL else None)
        data = lib.X509_NAME_ENTRY_get_data(entry)
        raw = ffi.buffer(lib.ASN1_STRING_get0_data(data), lib.ASN1_STRING_length(data))[:]
        values.append("".join(_ONELINE[byte] for byte in raw))
    if None in labels:  # OpenSSL has no name for the OID: its dotted form, as OpenSSL writes it
        oids = [attribute.oid.dotted_string for attribute in cert.to_cryptography().subject]
        labels = [label or oid for label, oid in zip(labels, oids, strict=True)]
    return "".join(f"/{label}={value}" for label, value in zip(labels, values, strict=True))


# How subject_oneline writes each byte of a value.
_ONELINE = [
    f"\\x{byte:02X}" if not 0x20 <= byte <= 0x7E else "\\" * (chr(byte) in "/+\\") + chr(byte)
    for byte in range(256)
]


def verify_error_text(errnum: int) -> str:
    """OpenSSL's text for an ``X509_V_ERR_*`` code, e.g. "certificate revoked"."""
    return ffi.string(lib.X509_verify_cert_error_string(errnum)).decode("ascii", "replace")


def pending_output(conn: SSL.Connection) -> int:
    """Bytes of ciphertext waiting in the memory BIO of ``conn`` (made with no socket).

    pyOpenSSL can only tell by reading them (``bio_read``), which allocates
    a buffer and raises ``WantReadError`` when there is nothing.
    """
    return lib.BIO_get_mem_data(conn._from_ssl, ffi.NULL)


def recv_into(conn: SSL.Connection, view: memoryview, nbytes: int) -> int:
    """``conn.recv_into(view, nbytes)`` without its temporary buffer and copy.

    pyOpenSSL decrypts into a buffer it allocates, then copies into ``view``;
    here ``SSL_read`` decrypts into ``view`` itself.  Same result, same
    exceptions (``WantReadError``, ``ZeroReturnError``, ``SysCallError``...).
    """
    nbytes = min(nbytes, len(view))
    result = lib.SSL_read(conn._ssl, ffi.from_buffer(view, require_writable=True), nbytes)
    if result <= 0:
        conn._raise_ssl_error(conn._ssl, result)
    return result

"""Options and environment in, one validated, frozen ``TlsConfig`` out.

It reads the TLS configuration from a mapping passed in: ``program.start``
passes the process's environment, tests plain dicts.  (The other variables
a program reads come from the same mapping, ``Setup.environ``, where they
matter: the ids of -U in ``serve.privileges``, systemd's in ``net.systemd``,
a super-server's in ``net.ucspi``; ``program`` alone names ``os.environ``.)
Every check of the configuration
that does not need to open a file happens here, once; ``context`` then turns
the result into TLS contexts, once.  A new feature is one more field here,
one more check in ``_validate`` and one more line in ``context``.

The TLS policy variables (versions, suites, groups, ALPN, PSK, allow-lists,
CRL, OCSP, sessions, key passphrase) are one table, ``VARIABLES``: each row
names the variable, the field it fills, the programs it applies to and the
function that checks its value.  A program ignores the rows that do not
apply to it, as s6-networking does.

With ``PSKFILE``, TLS 1.2's PSK suites (``PSK_CIPHERS``) come first in the
default ``TLS_CIPHERS``.  DTLS (s6-dtlsserver, s6-dtlsclient) is the field
``dtls``: the same policy where DTLS 1.2 allows it (version 1.2 only, PSK
through TLS 1.2's PSK suites, no TLS 1.3 suites, no session directory), plus the rows of
``DTLS_VARIABLES``: the MTU and the bounds of the handshake's
retransmission timer.

Errors: a missing or malformed variable or option is a ``UsageError`` (100),
as in s6-networking; an inconsistent TLS setup (a ``KEYFILE:name`` without
its ``CERTFILE:name``) is a ``ConfigError`` (96).  Whatever works but is
probably not what the user meant is a line in ``warnings``.
"""

import base64
import binascii
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError, UsageError
from ..net.names import encode_host_name, is_ip
from ..numbers import decimal

Role = Literal["server", "client"]
Verify = Literal["none", "optional", "required"]

# Mozilla's "intermediate" TLS 1.2 suites without finite-field DHE: forward
# secrecy and AEAD only, ECDSA and RSA certificates alike.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# TLS 1.3 suites whose hash is SHA-256: the only ones an external PSK can use.
PSK_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
VERSIONS = ("1.2", "1.3")
# TLS 1.2's PSK suites, forward-secret first, put before DEFAULT_CIPHERS with PSKFILE
# (every program: without them a server with PSKFILE alone has no TLS 1.2 suite).
PSK_CIPHERS = (
    "ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305"
)
# DTLS: 1.2 only (the OpenSSL in use has no DTLS 1.3); the largest UDP payload by
# default, so that a datagram fits a 1280-byte IPv6 packet (40 + 8 bytes of headers).
DTLS_MTU = 1232
# OpenSSL's own retransmission timer: 1 s, doubling to 60 s.  pyOpenSSL's binding
# cannot replace it (no DTLS_set_timer_cb), so s6tls can wait longer, never less.
OPENSSL_TIMER_MS = (1000, 60000)


@dataclass(frozen=True)
class Keypair:
    """A certificate chain and its private key, by file name (PEM or DER)."""

    certfile: str
    keyfile: str


@dataclass(frozen=True)
class Options:
    """What the command line says, before the environment is consulted.

    The defaults are s6-networking's: -s, -j, -z, -v 1, no -K, no -Y/-y.
    """

    close_notify: bool = False  # -S
    strict_close_notify: bool = False  # -J
    keep_env: bool = False  # -Z
    verbosity: int = 1  # -v
    handshake_timeout_ms: int = 0  # -K
    peer_verify: Verify = "none"  # server -Y/-y: client certificates
    client_cert: bool = False  # client -y
    sni_level: int = 0  # server -k
    servername: str | None = None  # client -k (or s6-tlsclient's host)
    verify_cert: bool = True  # client --no-verify-cert turns it off
    app_fds: tuple[int, int] = (6, 7)  # client -6 / -7
    idle_timeout: float | None = None
    port: int | None = None  # s6-tlsclient's port argument
    ktls: bool = False  # --ktls


@dataclass(frozen=True)
class TlsConfig:
    """Everything one s6tls program needs to know, validated.

    Build it with ``TlsConfig.from_env(role, environ, options)``.
    """

    role: Role
    options: Options
    keypair: Keypair | None = None
    sni_keypairs: tuple[tuple[str, Keypair], ...] = ()
    cafile: str | None = None
    cadir: str | None = None
    uid: int = 0
    gid: int = 0
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # The client's server name, IDNA-encoded: what SNI sends and the check matches.
    servername: str | None = None
    # The server's port, for TLS_SESSION_DIR: s6-tlsclient's argument or TCPREMOTEPORT.
    server_port: int | None = None
    # The policy, one field per row of VARIABLES.
    min_version: str = "1.2"
    max_version: str = "1.3"
    ciphers: str = DEFAULT_CIPHERS
    ciphersuites: str | None = None
    groups: str | None = None
    alpn: tuple[str, ...] = ()
    pskfile: str | None = None
    psk_identity: str | None = None
    peer_dns: tuple[str, ...] = ()
    peer_uri: tuple[str, ...] = ()
    peer_email: tuple[str, ...] = ()
    peer_ip: tuple[str, ...] = ()
    peer_spki: tuple[str, ...] = ()
    crlfile: str | None = None
    crl_check: str | None = None
    ocspfile: str | None = None
    ocsp: str | None = None
    session_dir: str | None = None
    keypassfile: str | None = None
    # DTLS instead of TLS, and one field per row of DTLS_VARIABLES (milliseconds, bytes).
    dtls: bool = False
    dtls_mtu: int = DTLS_MTU
    dtls_timeout_min: int = OPENSSL_TIMER_MS[0]
    dtls_timeout_max: int = OPENSSL_TIMER_MS[1]
    warnings: tuple[str, ...] = ()

    @property
    def verify_peer(self) -> Verify:
        """How the peer's certificate is checked: none, optional or required."""
        if self.role == "server":
            return self.options.peer_verify
        return "required" if self.options.verify_cert else "none"

    @property
    def servername_is_ip(self) -> bool:
        """True when the client's server name is an IP literal (no SNI is sent then)."""
        return self.servername is not None and is_ip(self.servername)

    @property
    def allow_lists(self) -> bool:
        """True when any TLS_PEER_* allow-list is set."""
        lists = (self.peer_dns, self.peer_uri, self.peer_email, self.peer_ip, self.peer_spki)
        return any(lists)

    @classmethod
    def from_env(
        cls, role: Role, environ: Mapping[str, str], options: Options, *, dtls: bool = False
    ) -> "TlsConfig":
        """Read CERTFILE, KEYFILE, their SNI variants, CAFILE, CADIR, TLS_UID, TLS_GID,
        and every row of ``VARIABLES`` (and, with ``dtls``, of ``DTLS_VARIABLES``)
        that applies to ``role``.

        Raises ``UsageError`` or ``ConfigError`` as the module docstring says.
        Opens no file.
        """
        sni = _sni_keypairs(environ) if role == "server" and options.sni_level > 0 else ()
        rows = VARIABLES + DTLS_VARIABLES if dtls else VARIABLES
        policy = {
            v.field: v.check(v.name, environ[v.name])
            for v in rows
            if role in v.roles and environ.get(v.name)
        }
        if "pskfile" in policy:
            policy.setdefault("ciphers", f"{PSK_CIPHERS}:{DEFAULT_CIPHERS}")
        if dtls:
            policy.setdefault("max_version", "1.2")
            policy.pop("session_dir", None)
        servername = None
        if role == "client" and options.servername is not None:
            servername = _servername(options.servername)
        cfg = cls(
            role=role,
            options=options,
            keypair=_keypair(environ),
            sni_keypairs=sni,
            cafile=environ.get("CAFILE") or None,
            cadir=environ.get("CADIR") or None,
            uid=_id(environ, "TLS_UID"),
            gid=_id(environ, "TLS_GID"),
            secrets=tuple(k for k in environ if is_secret_variable(k)),
            servername=servername,
            server_port=options.port or _port(environ, "TCPREMOTEPORT"),
            warnings=_warnings(role, environ, options, dtls),
            dtls=dtls,
            **policy,
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        o = self.options
        if o.handshake_timeout_ms < 0:
            raise UsageError("-K must be a number of milliseconds")
        if o.verbosity < 0:
            raise UsageError("-v must be a non-negative number")
        if self.dtls and "1.3" in (self.min_version, self.max_version):
            raise UsageError(
                "DTLS is 1.2 only: TLS_MIN_VERSION and TLS_MAX_VERSION can only be 1.2"
            )
        if VERSIONS.index(self.min_version) > VERSIONS.index(self.max_version):
            raise UsageError("TLS_MIN_VERSION is above TLS_MAX_VERSION")
        if self.dtls_timeout_min > self.dtls_timeout_max:
            raise UsageError("DTLS_HANDSHAKE_TIMEOUT_MIN is above DTLS_HANDSHAKE_TIMEOUT_MAX")
        if self.crl_check and not self.crlfile:
            raise UsageError("TLS_CRL_CHECK needs CRLFILE")
        suites = set(self.ciphersuites.split(":")) if self.ciphersuites else set(PSK_SUITES)
        if self.pskfile and self.max_version == "1.3" and not suites & set(PSK_SUITES):
            raise UsageError(f"PSKFILE needs {' or '.join(PSK_SUITES)} in TLS_CIPHERSUITES")
        has_ca = bool(self.cafile or self.cadir)
        if self.role == "server":
            if o.sni_level not in (0, 1, 2):
                raise UsageError("the server's -k takes an SNI level: 0, 1 or 2")
            if o.sni_level < 2 and self.keypair is None and not self.pskfile:
                raise UsageError("CERTFILE and KEYFILE must be set")
            if o.sni_level == 2 and not self.sni_keypairs:
                raise UsageError("-k 2 needs at least one CERTFILE:name/KEYFILE:name pair")
            if o.peer_verify != "none" and not has_ca:
                raise UsageError("-Y and -y need CAFILE or CADIR to check client certificates")
            if self.allow_lists and o.peer_verify != "required":
                raise UsageError("TLS_PEER_* allow-lists need -y: they match client certificates")
            if self.crlfile and o.peer_verify == "none":
                raise UsageError("CRLFILE needs -Y or -y: it checks client certificates")
        else:
            if o.verify_cert and not has_ca and not self.pskfile:
                raise UsageError("CAFILE or CADIR must be set (or use --no-verify-cert)")
            if o.client_cert and self.keypair is None:
                raise UsageError("-y needs CERTFILE and KEYFILE")
            r, w = o.app_fds
            if r < 3 or w < 3 or r == w:
                raise UsageError("-6 and -7 must be different descriptors, 3 or more")
            if self.psk_identity and not self.pskfile:
                raise UsageError("PSK_IDENTITY needs PSKFILE")
            if self.ocsp and not o.verify_cert:
                raise UsageError("TLS_OCSP=require cannot be met with --no-verify-cert")
            if self.crlfile and not o.verify_cert:
                raise UsageError("CRLFILE is not checked with --no-verify-cert")


@dataclass(frozen=True)
class Variable:
    """One policy variable: its name, its field, who reads it, and its check.

    ``check(name, value)`` returns the field's value or raises ``UsageError``.
    """

    name: str
    field: str
    roles: tuple[Role, ...]
    check: Callable[[str, str], object]


def _plain(name: str, value: str) -> str:
    """Any value without control characters (file names, cipher strings)."""
    if not value.isprintable():
        raise UsageError(f"invalid {name}: it holds a control character")
    return value


def _version(name: str, value: str) -> str:
    if value not in VERSIONS:
        raise UsageError(f"invalid {name}: {value!r} is not 1.2 or 1.3")
    return value


def _suites(name: str, value: str) -> str:
    items = value.split(":")
    if not all(s and s.isascii() and (s.replace("_", "").isalnum()) for s in items):
        raise UsageError(f"invalid {name}: {value!r} is not a :-separated list of names")
    return value


def _groups(name: str, value: str) -> str:
    items = value.split(":")
    if not all(g and g.isascii() and g.replace("-", "").replace("_", "").isalnum() for g in items):
        raise UsageError(f"invalid {name}: {value!r} is not a :-separated list of groups")
    return value


def _list(name: str, value: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in value.split(","))
    if not all(items) or not all(item.isprintable() for item in items):
        raise UsageError(f"invalid {name}: {value!r} is not a comma-separated list")
    return items


def _alpn(name: str, value: str) -> tuple[str, ...]:
    items = _list(name, value)
    for item in items:
        if not item.isascii() or len(item) > 255:
            raise UsageError(f"invalid {name}: {item!r} is not a protocol name")
    return items


def _psk_identity(name: str, value: str) -> str:
    if not value.isascii() or not value.isprintable() or ":" in value or len(value) > 128:
        raise UsageError(f"invalid {name}: printable ASCII without ':', at most 128 characters")
    return value


def _dns_list(name: str, value: str) -> tuple[str, ...]:
    out = []
    for item in _list(name, value):
        try:
            out.append(encode_host_name(item))
        except ValueError as exc:
            raise UsageError(f"invalid {name}: {item!r}: {exc}") from None
    return tuple(out)


def _uri_list(name: str, value: str) -> tuple[str, ...]:
    items = _list(name, value)
    for item in items:
        scheme, colon, rest = item.partition(":")
        if not colon or not rest or not scheme.isalnum() or " " in item:
            raise UsageError(f"invalid {name}: {item!r} is not a URI")
    return items


def _email_list(name: str, value: str) -> tuple[str, ...]:
    items = _list(name, value)
    for item in items:
        local, at, domain = item.rpartition("@")
        if not at or not local or not domain or " " in item:
            raise UsageError(f"invalid {name}: {item!r} is not an email address")
    return items


def _ip_list(name: str, value: str) -> tuple[str, ...]:
    try:
        return tuple(str(ipaddress.ip_address(item)) for item in _list(name, value))
    except ValueError as exc:
        raise UsageError(f"invalid {name}: {exc}") from None


def _spki_list(name: str, value: str) -> tuple[str, ...]:
    items = _list(name, value)
    for item in items:
        try:
            digest = base64.b64decode(item, validate=True)
        except binascii.Error:
            digest = b""
        if len(digest) != 32:
            raise UsageError(f"invalid {name}: {item!r} is not a base64 SHA-256 digest")
    return items


def _number(low: int, high: int, why: str = "") -> Callable[[str, str], int]:
    """A decimal integer from ``low`` to ``high``; ``why`` explains the bounds."""

    def check(name: str, value: str) -> int:
        number = decimal(value)
        if number is None or not low <= number <= high:
            raise UsageError(f"invalid {name}: {value!r} is not a number from {low} to {high}{why}")
        return number

    return check


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def check(name: str, value: str) -> str:
        if value not in allowed:
            raise UsageError(f"invalid {name}: {value!r} is not {' or '.join(allowed)}")
        return value

    return check


BOTH: tuple[Role, ...] = ("server", "client")
SERVER: tuple[Role, ...] = ("server",)
CLIENT: tuple[Role, ...] = ("client",)

VARIABLES = (
    Variable("TLS_MIN_VERSION", "min_version", BOTH, _version),
    Variable("TLS_MAX_VERSION", "max_version", BOTH, _version),
    Variable("TLS_CIPHERS", "ciphers", BOTH, _plain),
    Variable("TLS_CIPHERSUITES", "ciphersuites", BOTH, _suites),
    Variable("TLS_GROUPS", "groups", BOTH, _groups),
    Variable("TLS_ALPN", "alpn", BOTH, _alpn),
    Variable("PSKFILE", "pskfile", BOTH, _plain),
    Variable("PSK_IDENTITY", "psk_identity", CLIENT, _psk_identity),
    Variable("TLS_PEER_DNS", "peer_dns", BOTH, _dns_list),
    Variable("TLS_PEER_URI", "peer_uri", BOTH, _uri_list),
    Variable("TLS_PEER_EMAIL", "peer_email", BOTH, _email_list),
    Variable("TLS_PEER_IP", "peer_ip", BOTH, _ip_list),
    Variable("TLS_PEER_SPKI", "peer_spki", BOTH, _spki_list),
    Variable("CRLFILE", "crlfile", BOTH, _plain),
    Variable("TLS_CRL_CHECK", "crl_check", BOTH, _choice("leaf", "chain")),
    Variable("OCSPFILE", "ocspfile", SERVER, _plain),
    Variable("TLS_OCSP", "ocsp", CLIENT, _choice("require")),
    Variable("TLS_SESSION_DIR", "session_dir", CLIENT, _plain),
    Variable("KEYPASSFILE", "keypassfile", BOTH, _plain),
)

# Read by the DTLS programs only.
DTLS_VARIABLES = (
    Variable("DTLS_MTU", "dtls_mtu", BOTH, _number(256, 65507, " (bytes of UDP payload)")),
    Variable(
        "DTLS_HANDSHAKE_TIMEOUT_MIN",
        "dtls_timeout_min",
        BOTH,
        _number(OPENSSL_TIMER_MS[0], 600000, " ms: OpenSSL's first wait is 1000 ms"),
    ),
    Variable(
        "DTLS_HANDSHAKE_TIMEOUT_MAX",
        "dtls_timeout_max",
        BOTH,
        _number(OPENSSL_TIMER_MS[1], 600000, " ms: OpenSSL's own timer grows to 60000 ms"),
    ),
)

# Variables removed from the application's environment under -z (the default).
SECRET_VARIABLES = (
    "CADIR",
    "CAFILE",
    "CERTFILE",
    "KEYFILE",
    "TLS_UID",
    "TLS_GID",
    *(v.name for v in VARIABLES + DTLS_VARIABLES),
)
SECRET_PREFIXES = ("CERTFILE:", "KEYFILE:")


# OpenSSL's configuration for a server that serves one connection per process.
NO_TICKETS_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openssl-no-tickets.cnf")


def no_tickets_conf(environ: Mapping[str, str]) -> str | None:
    """The OPENSSL_CONF that makes OpenSSL send no TLS 1.3 session tickets, or None.

    For s6-tlsd: pyOpenSSL cannot set the number of tickets, OpenSSL's own
    configuration can (``NumTickets = 0``).  None when the user already set
    OPENSSL_CONF: their configuration is left alone.
    """
    return None if environ.get("OPENSSL_CONF") else NO_TICKETS_CONF


def is_secret_variable(name: str) -> bool:
    """True for the variables -z removes from the application's environment."""
    return name in SECRET_VARIABLES or name.startswith(SECRET_PREFIXES)


def _servername(name: str) -> str:
    """The -k name as SNI sends it and the check matches it: IDNA 2008, or an IP.

    Raises ``UsageError`` (100) for a name that is neither.
    """
    if not name:
        raise UsageError("-k needs a server name")
    if is_ip(name):
        return str(ipaddress.ip_address(name))
    try:
        return encode_host_name(name)
    except ValueError as exc:
        raise UsageError(f"invalid server name {name!r}: {exc}") from None


def _warnings(
    role: Role, environ: Mapping[str, str], options: Options, dtls: bool = False
) -> tuple[str, ...]:
    """What works as configured but is probably not what the user meant."""
    out = []
    if dtls and environ.get("TLS_CIPHERSUITES"):
        out.append("TLS_CIPHERSUITES is not used: DTLS 1.2 takes its suites from TLS_CIPHERS")
    if dtls and role == "client" and environ.get("TLS_SESSION_DIR"):
        out.append("TLS_SESSION_DIR is not used by DTLS")
    named = any(k.startswith("CERTFILE:") for k in environ)
    if role == "server" and options.sni_level == 0 and named:
        out.append("the CERTFILE:name keypairs are ignored without -k 1 or -k 2")
    if role == "client" and not options.verify_cert:
        out.append("not verifying the server's certificate (--no-verify-cert)")
    elif role == "client" and options.servername is None and not environ.get("PSKFILE"):
        out.append("the server's name is not checked, only its chain: use -k NAME to check it")
    if role == "client" and environ.get("TLS_SESSION_DIR") and not dtls:
        if options.servername is None:
            out.append("TLS_SESSION_DIR is not used without a server name (-k)")
        elif environ.get("PSKFILE"):
            out.append("TLS_SESSION_DIR is not used with PSKFILE")
    return tuple(out)


def _keypair(environ: Mapping[str, str]) -> Keypair | None:
    cert, key = environ.get("CERTFILE"), environ.get("KEYFILE")
    if not cert and not key:
        return None
    if not cert or not key:
        raise UsageError("CERTFILE and KEYFILE must be set together")
    return Keypair(cert, key)


def _sni_keypairs(environ: Mapping[str, str]) -> tuple[tuple[str, Keypair], ...]:
    certs = {k[len("CERTFILE:") :]: v for k, v in environ.items() if k.startswith("CERTFILE:")}
    keys = {k[len("KEYFILE:") :]: v for k, v in environ.items() if k.startswith("KEYFILE:")}
    for name in sorted(keys.keys() ^ certs.keys()):
        have, lack = ("KEYFILE", "CERTFILE") if name in keys else ("CERTFILE", "KEYFILE")
        raise ConfigError(f"unpaired SNI keypair: {have}:{name} is set but {lack}:{name} is not")
    pairs = []
    for name in sorted(certs):
        labels = name.split(".")
        if not name or "*" in name[1:] or (labels[0] == "*" and len(labels) < 2):
            raise ConfigError(f"invalid SNI name in CERTFILE:{name}")
        pairs.append((name.lower(), Keypair(certs[name], keys[name])))
    return tuple(pairs)


def _id(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value:
        return 0
    number = decimal(value)
    if number is None:
        raise UsageError(f"invalid {name}: {value!r} is not a numeric id")
    return number


def _port(environ: Mapping[str, str], name: str) -> int | None:
    return decimal(environ.get(name, ""))

"""Options and environment in, one validated, frozen ``TlsConfig`` out.

This is the only module that reads the environment, and it reads a mapping
passed in, so tests give it plain dicts.  Every check of the configuration
that does not need to open a file happens here, once; ``context`` then turns
the result into TLS contexts, once.  A new feature is one more field here,
one more check in ``_validate`` and one more line in ``context``.

Errors: a missing or malformed variable or option is a ``UsageError`` (100),
as in s6-networking; an inconsistent TLS setup (a ``KEYFILE:name`` without
its ``CERTFILE:name``) is a ``ConfigError`` (96).
"""

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError, UsageError

Role = Literal["server", "client"]
Verify = Literal["none", "optional", "required"]

# Variables removed from the application's environment under -z (the default).
SECRET_VARIABLES = ("CADIR", "CAFILE", "CERTFILE", "KEYFILE", "TLS_UID", "TLS_GID")
SECRET_PREFIXES = ("CERTFILE:", "KEYFILE:")


@dataclass(frozen=True)
class Keypair:
    """A PEM certificate chain and its private key, by file name."""

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
    servername: str | None = None  # client -k
    verify_cert: bool = True  # client --no-verify-cert turns it off
    app_fds: tuple[int, int] = (6, 7)  # client -6 / -7
    idle_timeout: float | None = None


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

    @property
    def verify_peer(self) -> Verify:
        """How the peer's certificate is checked: none, optional or required."""
        if self.role == "server":
            return self.options.peer_verify
        return "required" if self.options.verify_cert else "none"

    @property
    def servername_is_ip(self) -> bool:
        """True when the client's -k name is an IP literal (no SNI is sent then)."""
        return self.options.servername is not None and is_ip(self.options.servername)

    @classmethod
    def from_env(cls, role: Role, environ: Mapping[str, str], options: Options) -> "TlsConfig":
        """Read CERTFILE, KEYFILE, their SNI variants, CAFILE, CADIR, TLS_UID, TLS_GID.

        Raises ``UsageError`` or ``ConfigError`` as the module docstring says.
        Opens no file.
        """
        sni = _sni_keypairs(environ) if role == "server" and options.sni_level > 0 else ()
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
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        o = self.options
        if o.handshake_timeout_ms < 0:
            raise UsageError("-K must be a number of milliseconds")
        if o.verbosity < 0:
            raise UsageError("-v must be a non-negative number")
        has_ca = bool(self.cafile or self.cadir)
        if self.role == "server":
            if o.sni_level not in (0, 1, 2):
                raise UsageError("the server's -k takes an SNI level: 0, 1 or 2")
            if o.sni_level < 2 and self.keypair is None:
                raise UsageError("CERTFILE and KEYFILE must be set")
            if o.sni_level == 2 and not self.sni_keypairs:
                raise UsageError("-k 2 needs at least one CERTFILE:name/KEYFILE:name pair")
            if o.peer_verify != "none" and not has_ca:
                raise UsageError("-Y and -y need CAFILE or CADIR to check client certificates")
        else:
            if o.verify_cert and not has_ca:
                raise UsageError("CAFILE or CADIR must be set (or use --no-verify-cert)")
            if o.client_cert and self.keypair is None:
                raise UsageError("-y needs CERTFILE and KEYFILE")
            r, w = o.app_fds
            if r < 3 or w < 3 or r == w:
                raise UsageError("-6 and -7 must be different descriptors, 3 or more")
            if o.servername is not None and not o.servername:
                raise UsageError("-k needs a server name")


def is_secret_variable(name: str) -> bool:
    """True for the variables -z removes from the application's environment."""
    return name in SECRET_VARIABLES or name.startswith(SECRET_PREFIXES)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    if not value.isascii() or not value.isdigit():
        raise UsageError(f"invalid {name}: {value!r} is not a numeric id")
    return int(value)

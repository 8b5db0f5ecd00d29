"""Certificates, keys, trust anchors, CRLs, PSKs and OCSP responses, read from their files.

``load_credentials(cfg)`` opens every file the configuration names, once,
and returns what it holds as objects, so that contexts can be built again
from memory (a new session ticket key) without touching the files.  Each
certificate, key, CA or CRL file may be PEM or DER, told apart by content;
an encrypted key is decrypted with ``KEYPASSFILE``'s first line and never
prompts for a passphrase.

Raises ``ConfigError`` (exit 96) with one line that names the file and what
to do: unreadable, neither PEM nor DER, a key that does not match its
certificate, an encrypted key without ``KEYPASSFILE``.  What works but is
likely wrong (an expired certificate or CRL, a key others can read) goes into
``Credentials.warnings``.
"""

import datetime
import os
import re
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    load_der_private_key,
    load_pem_private_key,
)

from ..errors import ConfigError
from .config import Keypair, TlsConfig

_PEM_BEGIN = b"-----BEGIN "
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
MIN_PSK = 16


@dataclass(frozen=True)
class LoadedKeypair:
    """A certificate chain (leaf first) and its private key, checked to match."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes


@dataclass(frozen=True)
class Credentials:
    """Everything read from files for one configuration."""

    keypair: LoadedKeypair | None = None
    sni: tuple[tuple[str, LoadedKeypair], ...] = ()
    cas: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    psks: tuple[tuple[bytes, bytes], ...] = ()  # (identity, key), file order
    ocsp: bytes | None = None
    warnings: tuple[str, ...] = ()


def load_credentials(cfg: TlsConfig, now: datetime.datetime | None = None) -> Credentials:
    """Read every file ``cfg`` names that its role uses; see the module docstring."""
    now = now or datetime.datetime.now(datetime.UTC)
    warnings: list[str] = []
    password = _passphrase(cfg.keypassfile, warnings) if cfg.keypassfile else None
    keypair = None
    wanted = cfg.options.client_cert if cfg.role == "client" else cfg.options.sni_level < 2
    if cfg.keypair and wanted:
        keypair = _load_keypair(cfg.keypair, password, now, warnings)
    sni = tuple(
        (name, _load_keypair(pair, password, now, warnings)) for name, pair in cfg.sni_keypairs
    )
    needs_trust = cfg.verify_peer != "none"
    cas = _load_cas(cfg.cafile, warnings) if cfg.cafile and needs_trust else ()
    crls = _load_crls(cfg.crlfile, now, warnings) if cfg.crlfile and needs_trust else ()
    psks = _load_psks(cfg.pskfile, warnings) if cfg.pskfile else ()
    if cfg.psk_identity and cfg.psk_identity.encode() not in dict(psks):
        raise ConfigError(f"PSK_IDENTITY {cfg.psk_identity} is not in PSKFILE {cfg.pskfile}")
    ocsp = None
    if cfg.ocspfile and keypair is not None:
        ocsp = _load_ocsp(cfg.ocspfile, keypair.chain[0], now, warnings)
    return Credentials(keypair, sni, cas, crls, psks, ocsp, tuple(warnings))


def _read(what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"unable to read {what} {path}: {exc.strerror}") from None


def _private(what: str, path: str, warnings: list[str]) -> None:
    """Warn when a secret file is readable by its group or by others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(
            f"{what} {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}):"
            " chmod go-rwx it"
        )


def is_pem(data: bytes) -> bool:
    """True for PEM text (a BEGIN line anywhere), False for anything else (DER)."""
    return _PEM_BEGIN in data


def _parse_certificates(what: str, path: str, data: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates in ``data``, read from ``path``; ``ConfigError`` (96) if none."""
    try:
        if is_pem(data):
            return tuple(x509.load_pem_x509_certificates(data))
        return (x509.load_der_x509_certificate(data),)
    except ValueError:
        kind = "holds no PEM certificate" if is_pem(data) else "is neither PEM nor DER"
        raise ConfigError(f"{what} {path} {kind}: give a certificate file") from None


def _load_key(path: str, password: bytes | None, warnings: list[str]) -> PrivateKeyTypes:
    data = _read("KEYFILE", path)
    _private("KEYFILE", path, warnings)
    load = load_pem_private_key if is_pem(data) else load_der_private_key
    try:
        return load(data, password)
    except TypeError:  # a key with a passphrase and none given, or the reverse
        if password is None:
            raise ConfigError(
                f"KEYFILE {path} is encrypted: set KEYPASSFILE to a file holding its passphrase"
            ) from None
        return load(data, None)  # KEYPASSFILE set, this key needs none
    except ValueError as exc:
        if password is not None and "password" in str(exc).lower():
            raise ConfigError(f"KEYPASSFILE does not decrypt KEYFILE {path}") from None
        kind = "holds no PEM private key" if is_pem(data) else "is neither PEM nor a DER key"
        raise ConfigError(f"KEYFILE {path} {kind}: give a private key file") from None


def _load_keypair(
    pair: Keypair, password: bytes | None, now: datetime.datetime, warnings: list[str]
) -> LoadedKeypair:
    chain = _parse_certificates("CERTFILE", pair.certfile, _read("CERTFILE", pair.certfile))
    key = _load_key(pair.keyfile, password, warnings)
    if chain[0].public_key() != key.public_key():
        raise ConfigError(
            f"KEYFILE {pair.keyfile} does not match the certificate in CERTFILE"
            f" {pair.certfile}: give the key that belongs to this certificate"
        )
    leaf = chain[0]
    if leaf.not_valid_after_utc < now:
        warnings.append(
            f"the certificate in CERTFILE {pair.certfile} expired on"
            f" {timestamp(leaf.not_valid_after_utc)}: peers will refuse it"
        )
    elif leaf.not_valid_before_utc > now:
        warnings.append(
            f"the certificate in CERTFILE {pair.certfile} is not valid before"
            f" {timestamp(leaf.not_valid_before_utc)}: peers will refuse it until then"
        )
    return LoadedKeypair(chain, key)


def timestamp(when: datetime.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``, the form of every date s6tls prints or exports."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load_cas(path: str, warnings: list[str]) -> tuple[x509.Certificate, ...]:
    data = _read("CAFILE", path)
    cas = _parse_certificates("CAFILE", path, data)
    if _PEM_CRL.search(data):
        warnings.append(f"CAFILE {path} holds CRLs, which are not checked there: use CRLFILE")
    return cas


def _load_crls(
    path: str, now: datetime.datetime, warnings: list[str]
) -> tuple[x509.CertificateRevocationList, ...]:
    """The CRLs in ``path``; one warning for each that has expired or is not valid yet.

    OpenSSL refuses every certificate such a CRL covers ("CRL has expired"):
    the warning says so at start and at each reload, before clients do.
    """
    data = _read("CRLFILE", path)
    try:
        if is_pem(data):
            blocks = _PEM_CRL.findall(data)
            if not blocks:
                raise ValueError("no CRL")
            crls = tuple(x509.load_pem_x509_crl(b) for b in blocks)
        else:
            crls = (x509.load_der_x509_crl(data),)
    except ValueError:
        raise ConfigError(f"CRLFILE {path} holds no PEM or DER CRL: give a CRL file") from None
    for crl in crls:
        which = f"the CRL of {crl.issuer.rfc4514_string()} in CRLFILE {path}"
        expiry = crl.next_update_utc
        if expiry is not None and expiry < now:
            warnings.append(
                f"{which} expired on {timestamp(expiry)}: every certificate it covers"
                " will be refused until it is replaced"
            )
        elif crl.last_update_utc > now:
            warnings.append(
                f"{which} is not valid before {timestamp(crl.last_update_utc)}: every"
                " certificate it covers will be refused until then"
            )
    return crls


def _load_ocsp(
    path: str, leaf: x509.Certificate, now: datetime.datetime, warnings: list[str]
) -> bytes:
    """The DER response to staple: it must be one for ``leaf``; a stale one is a warning."""
    from .ocsp import response_for, status_problem  # only then: its imports cost start-up time

    data = _read("OCSPFILE", path)
    try:
        response = response_for(data, leaf)
    except ValueError as exc:
        raise ConfigError(f"OCSPFILE {path} {exc}: give the OCSP response for CERTFILE") from None
    problem = status_problem(response, now)
    if problem:
        warnings.append(f"OCSPFILE {path}: {problem}; clients that require OCSP will refuse it")
    return data


def _passphrase(path: str, warnings: list[str]) -> bytes:
    _private("KEYPASSFILE", path, warnings)
    return _read("KEYPASSFILE", path).split(b"\n", 1)[0].rstrip(b"\r")


def _load_psks(path: str, warnings: list[str]) -> tuple[tuple[bytes, bytes], ...]:
    """``identity:hexkey`` lines; blank lines and ``#`` comments are skipped."""
    _private("PSKFILE", path, warnings)
    psks: dict[bytes, bytes] = {}
    for number, raw in enumerate(_read("PSKFILE", path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        identity, colon, hexkey = line.partition(b":")
        where = f"PSKFILE {path} line {number}"
        try:
            key = bytes.fromhex(hexkey.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            key = b""
        text = identity.decode("ascii", "replace")
        if not colon or not identity or not identity.isascii() or not text.isprintable():
            raise ConfigError(f"{where}: not identity:hexkey")
        if len(key) < MIN_PSK:
            raise ConfigError(f"{where}: the key must be at least {MIN_PSK} bytes of hex")
        if identity in psks:
            raise ConfigError(f"{where}: identity {identity.decode()} is listed twice")
        psks[identity] = key
    if not psks:
        raise ConfigError(f"PSKFILE {path} lists no identity:hexkey line")
    return tuple(psks.items())

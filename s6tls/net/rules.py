"""s6's access-control rules, as s6-tcpserver-access reads them.

A ruleset maps *keys* to rules.  For a client at an IPv4 address the keys
are ``ip4/ADDR_N`` for N from 32 down to 0, ADDR being the address with all
but its first N bits cleared (``ip4/192.168.0.7_32``, ``ip4/192.168.0.6_31``,
... ``ip4/0.0.0.0_0``); for IPv6, ``ip6/ADDR_N`` for N from 128 down to 0,
ADDR written as skalibs writes it (lower case, the first longest run of two
or more zero groups as ``::``); for a host name, ``reversedns/NAME`` for the
name and each of its suffixes (``reversedns/a.example.org``,
``reversedns/example.org``, ``reversedns/org``), then ``reversedns/@``.
The first key that has a rule decides.

A rule allows or denies; an allowing rule may also carry environment
changes (an ``env/`` directory in s6-envdir's format: each file a variable,
its first line the value, an empty file unsetting it) and an ``exec``
command line for execlineb that replaces prog.

Two stores hold rulesets, with the same format as s6's:
``RulesDirectory`` (``-i``: ``rulesdir/KEY/allow``, ``rulesdir/KEY/deny``,
``rulesdir/KEY/env/``, ``rulesdir/KEY/exec``, read anew for every lookup)
and ``RulesFile`` (``-x``: the cdb that s6-accessrules-cdb-from-fs compiles
from such a directory, read with the ``cdbx`` package).
"""

import enum
import errno
import ipaddress
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import SystemFailure

ENV_VALUE_MAX = 4095  # skalibs' envdir reads at most this much of each file
EXEC_MAX = 4096  # and s6 at most this much of an exec file

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class Decision(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True)
class Rule:
    """The rule found under ``key``.

    ``env`` is a sequence of (name, value) changes in order, value None
    meaning "unset"; ``exec`` the execlineb command line that replaces prog.
    Both are empty for a denying rule.
    """

    key: str
    decision: Decision
    env: tuple[tuple[str, str | None], ...] = ()
    exec: str | None = None


class Ruleset(Protocol):
    def lookup(self, key: str) -> Rule | None:
        """The rule for exactly ``key``, None if there is none.

        Raises ``SystemFailure`` if the store cannot be read or holds an
        invalid rule.
        """
        ...


def ip_keys(ip: str) -> Iterator[str]:
    """The keys for a client at ``ip``, most specific first (33 or 129 of them)."""
    addr = ipaddress.ip_address(ip)
    bits = addr.max_prefixlen
    prefix = f"ip{addr.version}"
    value = int(addr)
    for n in range(bits, -1, -1):
        net = value & ~((1 << (bits - n)) - 1)
        text = ip6_text(net) if addr.version == 6 else str(ipaddress.IPv4Address(net))
        yield f"{prefix}/{text}_{n}"


def ip6_text(value: int) -> str:
    """An IPv6 address in skalibs' text form (``ip6_fmt``), from its integer value.

    Lower-case hex without leading zeros; the first of the longest runs of
    two or more zero groups becomes ``::``; never a dotted IPv4 tail.
    """
    groups = struct.unpack("!8H", value.to_bytes(16, "big"))
    best_start, best_len, start = -1, 1, -1
    for i, group in enumerate((*groups, 1)):
        if group == 0 and start < 0:
            start = i
        elif group != 0 and start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    hexes = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(hexes)
    head = ":".join(hexes[:best_start])
    tail = ":".join(hexes[best_start + best_len :])
    return f"{head}::{tail}"


def is_host_name(name: str) -> bool:
    """True for a name usable as a ``reversedns/`` key: dot-separated LDH labels.

    A name from the DNS is the client's to choose: anything else (a slash,
    an empty label, control characters) must never reach the rules store.
    """
    name = name.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def name_keys(name: str) -> Iterator[str]:
    """The keys for a client named ``name`` (lower case, checked by ``is_host_name``)."""
    if not is_host_name(name.lower()):
        raise ValueError(f"not a host name: {name!r}")
    labels = name.lower().removesuffix(".").split(".")
    for i in range(len(labels)):
        yield "reversedns/" + ".".join(labels[i:])
    yield "reversedns/@"


def first_match(ruleset: Ruleset, keys: Iterable[str]) -> Rule | None:
    """The rule of the first of ``keys`` that has one, or None."""
    for key in keys:
        rule = ruleset.lookup(key)
        if rule is not None:
            return rule
    return None


def apply_env(env: dict[str, str], changes: Iterable[tuple[str, str | None]]) -> None:
    """Apply (name, value) changes to ``env`` in order; value None unsets."""
    for name, value in changes:
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value


class RulesDirectory:
    """A ruleset in a directory (``-i rulesdir``), read at each lookup.

    The directory may change while the server runs: every connection sees
    the rules as they are when it is checked.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def lookup(self, key: str) -> Rule | None:
        base = os.path.join(self.path, key)
        if _readable(os.path.join(base, "allow")):
            env = tuple(_read_envdir(os.path.join(base, "env")))
            command = _read_file(os.path.join(base, "exec"), EXEC_MAX)
            return Rule(key, Decision.ALLOW, env, command.decode(errors="surrogateescape") or None)
        if _readable(os.path.join(base, "deny")):
            return Rule(key, Decision.DENY)
        return None


class RulesFile:
    """A ruleset compiled into a cdb by s6-accessrules-cdb-from-fs (``-x rulesfile``).

    The file is opened when the object is made: make one per connection, so
    that a file replaced (atomically, as s6-accessrules-cdb-from-fs does)
    is seen by the next connection.  Raises ``SystemFailure`` if it cannot
    be opened or is not a cdb.
    """

    def __init__(self, path: str) -> None:
        import cdbx  # only servers with -x need it

        self.path = path
        try:
            self._cdb = cdbx.CDB(path)
            self._cdb.get(b"")  # a file that is no cdb fails here, not at the first client
        except OSError as exc:  # cdbx reports a file that is no cdb as OSError too
            raise SystemFailure(f"unable to open rules file {path}: {_reason(exc)}") from None

    def lookup(self, key: str) -> Rule | None:
        try:
            value = self._cdb.get(key.encode("utf-8", "surrogateescape"))
            return None if value is None else parse_cdb_rule(key, value)
        except (OSError, ValueError) as exc:
            raise SystemFailure(f"invalid rule {key} in {self.path}: {_reason(exc)}") from None

    def close(self) -> None:
        self._cdb.close()


def parse_cdb_rule(key: str, value: bytes) -> Rule | None:
    """A rule from its cdb encoding: ``D``, or ``A``, env length, env, exec length, exec.

    The lengths are 16-bit big-endian; env is a series of ``NAME=value\\0``
    (set) and ``NAME\\0`` (unset).  A value starting with another letter is
    no rule (None), as in s6.  Raises ``ValueError`` for anything malformed.
    """
    if not value or len(value) > 5 + 2 * EXEC_MAX:
        raise ValueError("bad length")
    if value[:1] == b"D":
        return Rule(key, Decision.DENY)
    if value[:1] != b"A":
        return None
    if len(value) < 5:
        raise ValueError("truncated")
    (envlen,) = struct.unpack_from("!H", value, 1)
    if envlen > EXEC_MAX or len(value) - 5 < envlen:
        raise ValueError("bad environment length")
    (execlen,) = struct.unpack_from("!H", value, 3 + envlen)
    if execlen > EXEC_MAX or 5 + envlen + execlen != len(value):
        raise ValueError("bad exec length")
    block = value[3 : 3 + envlen]
    if block and not block.endswith(b"\0"):
        raise ValueError("unterminated environment")
    env = []
    for entry in block.split(b"\0")[:-1] if block else []:
        name, eq, val = entry.decode(errors="surrogateescape").partition("=")
        if not name:
            raise ValueError("empty variable name")
        env.append((name, val if eq else None))
    command = value[5 + envlen :].decode(errors="surrogateescape")
    return Rule(key, Decision.ALLOW, tuple(env), command or None)


def _readable(path: str) -> bool:
    """access(R_OK) as s6 uses it: absent or unreadable is False, other errors raise."""
    if os.access(path, os.R_OK):
        return True
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SystemFailure(f"unable to check rule {path}: {_reason(exc)}") from None
    return False


def _read_file(path: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``path``; b"" if it does not exist or cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES):
            return b""
        raise SystemFailure(f"unable to read {path}: {_reason(exc)}") from None


def _read_envdir(path: str) -> Iterator[tuple[str, str | None]]:
    """The changes an ``env/`` directory makes, as s6-envdir makes them."""
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SystemFailure(f"unable to read {path}: {_reason(exc)}") from None
    for name in names:
        if name.startswith(".") or "=" in name:
            continue
        try:
            with open(os.path.join(path, name), "rb") as f:
                data = f.read(ENV_VALUE_MAX)
        except OSError as exc:
            raise SystemFailure(f"unable to read {path}/{name}: {_reason(exc)}") from None
        if not data:
            yield name, None
            continue
        line = data.split(b"\n", 1)[0].rstrip(b" \t\r").replace(b"\0", b"\n")
        yield name, line.decode(errors="surrogateescape")


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)

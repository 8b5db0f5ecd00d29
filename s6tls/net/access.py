"""Who may connect, and what prog learns about them: s6-tcpserver-access's checks.

``admit`` decides, for one client, from the access rules and the resolver
it is given, with no I/O of its own: a test passes a dict-backed resolver,
the server the system one.  The decision follows s6-tcpserver-access:

1. The rules are searched by the client's IP, most specific prefix first.
   A deny is final.  With no rule at all and no name lookups (-H), the
   client is refused; with no ruleset, every client is allowed.
2. Unless -H, the names are looked up: TCPLOCALHOST (or -l localname) and
   TCPREMOTEHOST.  Under -p (paranoid) the remote name is kept only if it
   resolves back to the client's address.  If the IP had no rule, the rules
   are searched by that name, then by its suffixes, then ``reversedns/@``;
   anything but an allow refuses the client.
3. A failed look-up (not "no name": a timeout, a server failure) refuses
   the client under -w and is a warning under -W, the default.

The environment changes are the matching rule's ``env/`` first, then
TCPREMOTEINFO (always unset: s6tls does no ident), TCPLOCALHOST and
TCPREMOTEHOST, as s6-tcpserver-access makes them.
"""

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..errors import Refused, SystemFailure
from .resolver import LookupFailed
from .rules import (
    Decision,
    Rule,
    RulesDirectory,
    Ruleset,
    RulesFile,
    first_match,
    ip_keys,
    is_host_name,
    name_keys,
)


class Denied(Refused):
    """The rules refuse the client (a deny, or no rule that allows it): exit 1."""


class Resolver(Protocol):
    def name_of(self, ip: str) -> str | None: ...

    def addresses_of(self, name: str, version: int) -> set[str]: ...


@dataclass(frozen=True)
class AccessPolicy:
    """s6-tcpserver-access's options, as s6-tlsserver takes them.

    ``rules`` with ``rules_kind`` "directory" is -i, "file" is -x.
    """

    rules: str | None = None
    rules_kind: Literal["directory", "file"] = "directory"
    dns: bool = True  # -H turns it off
    paranoid: bool = False  # -p
    strict: bool = False  # -w
    localname: str | None = None  # -l
    timeout_ms: int = 0  # -t: bound on the name look-ups, 0 for none

    def check_rules(self) -> None:
        """At start: the rules can be read (a directory, a readable cdb), or raise.

        Raises ``SystemFailure`` (111), as the first connection would.
        """
        if self.rules_kind == "file" and self.rules is not None:
            RulesFile(self.rules).close()
        elif self.rules is not None and not os.path.isdir(self.rules):
            raise SystemFailure(f"unable to read rules directory {self.rules}: not a directory")

    def open_rules(self) -> Ruleset | None:
        """The ruleset as it is now (a cdb is opened anew); None without -i or -x."""
        if self.rules is None:
            return None
        if self.rules_kind == "file":
            return RulesFile(self.rules)
        return RulesDirectory(self.rules)


@dataclass
class Admission:
    """An allowed client: how prog's environment changes, and what replaces prog."""

    env: list[tuple[str, str | None]] = field(default_factory=list)
    exec: str | None = None
    rule: str | None = None  # the key of the allowing rule, for the log


def admit(
    policy: AccessPolicy,
    ruleset: Ruleset | None,
    resolver: Resolver,
    remote_ip: str,
    local_ip: str,
    warn: Callable[[str], None],
) -> Admission:
    """Decide for the client at ``remote_ip`` that connected to ``local_ip``.

    ``warn`` receives the warnings of -W (one line each, no newline).
    Raises ``Refused`` with the reason when the client is refused, and
    ``SystemFailure`` when the ruleset cannot be read.
    """
    rule = first_match(ruleset, ip_keys(remote_ip)) if ruleset is not None else None
    if rule is not None and rule.decision is Decision.DENY:
        raise Denied(f"denied by rule {rule.key}")
    if ruleset is not None and rule is None and not policy.dns:
        raise Denied("no rule matches")
    if not policy.dns:
        names: list[tuple[str, str | None]] = [
            ("TCPREMOTEINFO", None),
            ("TCPLOCALHOST", policy.localname),
            ("TCPREMOTEHOST", None),
        ]
        return _allowed(rule, names)
    look = _Lookups(policy, resolver, warn)
    localhost = policy.localname or look.name("local", local_ip)
    remotehost = look.name("remote", remote_ip)
    if remotehost is None and policy.paranoid and policy.strict:
        raise Refused(f"no name for {remote_ip} (paranoid, strict)")
    if remotehost is not None and policy.paranoid:
        remotehost = look.confirmed(remotehost, remote_ip)
    if ruleset is not None and rule is None:
        rule = first_match(ruleset, name_keys(remotehost)) if remotehost else None
        if rule is None or rule.decision is Decision.DENY:
            raise Denied(f"denied by rule {rule.key}" if rule else "no rule matches")
    names = [
        ("TCPREMOTEINFO", None),
        ("TCPLOCALHOST", localhost),
        ("TCPREMOTEHOST", remotehost),
    ]
    return _allowed(rule, names)


def _allowed(rule: Rule | None, names: list[tuple[str, str | None]]) -> Admission:
    if rule is None:
        return Admission(env=names)
    return Admission(env=[*rule.env, *names], exec=rule.exec, rule=rule.key)


class _Lookups:
    """The look-ups of one admission, failing as -w/-W says."""

    def __init__(self, policy: AccessPolicy, resolver: Resolver, warn: Callable[[str], None]):
        self.policy = policy
        self.resolver = resolver
        self.warn = warn

    def _failed(self, what: str, exc: LookupFailed) -> None:
        text = f"unable to {what}: {exc}"
        if self.policy.strict:
            raise Refused(text)
        self.warn(text)

    def name(self, side: str, ip: str) -> str | None:
        """The name of ``ip``, None if it has none, is not a host name, or the look-up failed."""
        try:
            name = self.resolver.name_of(ip)
        except LookupFailed as exc:
            self._failed(f"look up the {side} name", exc)
            return None
        if name is not None and not is_host_name(name.lower()):
            self.warn(f"ignoring the {side} name of {ip}: not a host name: {name!r}")
            return None
        return name.removesuffix(".") if name else None

    def confirmed(self, name: str, ip: str) -> str | None:
        """``name`` if it resolves back to ``ip`` (paranoid mode), else None."""
        addr = ipaddress.ip_address(ip)
        try:
            found = self.resolver.addresses_of(name, addr.version)
        except LookupFailed as exc:
            self._failed(f"resolve {name} (paranoid)", exc)
            return None
        if any(ipaddress.ip_address(a) == addr for a in found):
            return name
        self.warn(f"{name} does not resolve to {ip}: TCPREMOTEHOST left unset (paranoid)")
        return None

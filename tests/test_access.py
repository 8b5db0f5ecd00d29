"""Who may connect: s6-tcpserver-access's decision, with a resolver given as data.

The last tests ask the real system resolver about 127.0.0.1, whose name
(``localhost``) comes from /etc/hosts both ways on every Debian machine.
"""

import socket
import time

import pytest
from test_rules import write_rules

from s6tls.errors import ExitCode, Refused
from s6tls.net.access import AccessPolicy, admit
from s6tls.net.resolver import LookupFailed, SystemResolver
from s6tls.net.rules import RulesDirectory


class FakeResolver:
    """Names and addresses from dicts; a value that is an exception is raised."""

    def __init__(self, names=None, addresses=None):
        self.names = names or {}
        self.addresses = addresses or {}
        self.asked: list[str] = []

    def name_of(self, ip):
        self.asked.append(ip)
        value = self.names.get(ip)
        if isinstance(value, Exception):
            raise value
        return value

    def addresses_of(self, name, version):
        self.asked.append(name)
        value = self.addresses.get(name, set())
        if isinstance(value, Exception):
            raise value
        return value


NAMES = {"192.0.2.1": "client.example.org", "192.0.2.99": "server.example.org"}


def decide(rules=None, tmp_path=None, resolver=None, remote="192.0.2.1", **policy):
    warnings: list[str] = []
    ruleset = None
    if rules is not None:
        write_rules(tmp_path, rules)
        ruleset = RulesDirectory(str(tmp_path))
    resolver = resolver or FakeResolver(NAMES, {"client.example.org": {"192.0.2.1"}})
    admission = admit(
        AccessPolicy(**policy), ruleset, resolver, remote, "192.0.2.99", warnings.append
    )
    return dict(admission.env), admission, warnings


def test_without_rules_everyone_is_allowed_and_named():
    env, admission, warnings = decide()
    assert env == {
        "TCPREMOTEINFO": None,
        "TCPLOCALHOST": "server.example.org",
        "TCPREMOTEHOST": "client.example.org",
    }
    assert admission.rule is None and admission.exec is None and warnings == []


def test_no_dns_sets_no_names_and_localname_is_taken_as_given():
    resolver = FakeResolver(NAMES)
    env, _, _ = decide(dns=False, localname="me.example", resolver=resolver)
    assert env == {"TCPREMOTEINFO": None, "TCPLOCALHOST": "me.example", "TCPREMOTEHOST": None}
    assert resolver.asked == []


def test_localname_replaces_the_local_lookup():
    resolver = FakeResolver(NAMES)
    env, _, _ = decide(localname="me.example", resolver=resolver)
    assert env["TCPLOCALHOST"] == "me.example"
    assert resolver.asked == ["192.0.2.1"]


def test_a_deny_by_ip_is_final_and_asks_no_name(tmp_path):
    resolver = FakeResolver(NAMES)
    rules = {"ip4/192.0.2.0_24": {"deny": True}, "reversedns/example.org": {"allow": True}}
    with pytest.raises(Refused, match=r"^denied by rule ip4/192\.0\.2\.0_24$") as info:
        decide(rules, tmp_path, resolver)
    assert info.value.exit_code == ExitCode.REFUSED
    assert resolver.asked == []


def test_an_allow_by_ip_brings_its_env_and_exec_before_the_names(tmp_path):
    rules = {
        "ip4/192.0.2.0_24": {
            "allow": True,
            "env": {"RELAYCLIENT": b"\n", "TCPREMOTEHOST": b"forged\n"},
            "exec": "echo hi",
        }
    }
    env, admission, _ = decide(rules, tmp_path)
    assert admission.rule == "ip4/192.0.2.0_24"
    assert admission.exec == "echo hi"
    assert env["RELAYCLIENT"] == ""
    # The names come after the rule's env, as in s6: a rule cannot forge them.
    assert admission.env[-1] == ("TCPREMOTEHOST", "client.example.org")


def test_no_ip_rule_and_no_dns_refuses(tmp_path):
    with pytest.raises(Refused, match=r"^no rule matches$"):
        decide({"ip4/10.0.0.0_8": {"allow": True}}, tmp_path, dns=False)


def test_no_ip_rule_falls_back_to_the_name_and_its_suffixes(tmp_path):
    env, admission, _ = decide({"reversedns/example.org": {"allow": True}}, tmp_path)
    assert admission.rule == "reversedns/example.org"
    assert env["TCPREMOTEHOST"] == "client.example.org"


def test_reversedns_at_matches_any_named_client(tmp_path):
    _, admission, _ = decide({"reversedns/@": {"allow": True}}, tmp_path)
    assert admission.rule == "reversedns/@"


def test_a_client_without_a_name_matches_no_name_rule(tmp_path):
    with pytest.raises(Refused, match=r"^no rule matches$"):
        decide({"reversedns/@": {"allow": True}}, tmp_path, remote="192.0.2.2")


def test_a_deny_by_name_refuses(tmp_path):
    rules = {"reversedns/client.example.org": {"deny": True}, "reversedns/@": {"allow": True}}
    with pytest.raises(Refused, match=r"denied by rule reversedns/client\.example\.org"):
        decide(rules, tmp_path)


def test_ipv6_prefix_rules(tmp_path):
    rules = {"ip6/2001:db8::_32": {"allow": True}, "ip6/2001:db8:bad::_48": {"deny": True}}
    resolver = FakeResolver()
    _, admission, _ = decide(rules, tmp_path, resolver, remote="2001:db8:1::5")
    assert admission.rule == "ip6/2001:db8::_32"
    with pytest.raises(Refused, match=r"ip6/2001:db8:bad::_48"):
        decide(rules, tmp_path / "again", resolver, remote="2001:db8:bad::1")


def test_paranoid_keeps_a_name_that_resolves_back():
    env, _, warnings = decide(paranoid=True)
    assert env["TCPREMOTEHOST"] == "client.example.org"
    assert warnings == []


def test_paranoid_drops_a_name_that_does_not_resolve_back(tmp_path):
    resolver = FakeResolver(NAMES, {"client.example.org": {"198.51.100.7"}})
    env, _, warnings = decide(resolver=resolver, paranoid=True)
    assert env["TCPREMOTEHOST"] is None
    assert warnings == [
        "client.example.org does not resolve to 192.0.2.1: TCPREMOTEHOST left unset (paranoid)"
    ]
    # and so a rule on that name cannot let the client in
    with pytest.raises(Refused, match=r"no rule matches"):
        decide({"reversedns/@": {"allow": True}}, tmp_path, resolver, paranoid=True)


def test_without_paranoid_the_name_is_not_checked():
    resolver = FakeResolver(NAMES, {"client.example.org": {"198.51.100.7"}})
    env, _, _ = decide(resolver=resolver)
    assert env["TCPREMOTEHOST"] == "client.example.org"
    assert "client.example.org" not in resolver.asked


def test_a_failed_lookup_is_a_warning_under_W():
    resolver = FakeResolver({**NAMES, "192.0.2.1": LookupFailed("timed out")})
    env, _, warnings = decide(resolver=resolver)
    assert env["TCPREMOTEHOST"] is None
    assert warnings == ["unable to look up the remote name: timed out"]


def test_a_failed_lookup_refuses_under_w():
    resolver = FakeResolver({**NAMES, "192.0.2.1": LookupFailed("server failure")})
    with pytest.raises(Refused, match=r"^unable to look up the remote name: server failure$"):
        decide(resolver=resolver, strict=True)


def test_a_failed_paranoid_lookup_refuses_under_w():
    resolver = FakeResolver(NAMES, {"client.example.org": LookupFailed("timed out")})
    with pytest.raises(Refused, match=r"unable to resolve client\.example\.org \(paranoid\)"):
        decide(resolver=resolver, paranoid=True, strict=True)


def test_no_name_at_all_refuses_under_paranoid_and_w_only():
    env, _, _ = decide(remote="192.0.2.2", paranoid=True)
    assert env["TCPREMOTEHOST"] is None
    with pytest.raises(Refused, match=r"no name for 192\.0\.2\.2"):
        decide(remote="192.0.2.2", paranoid=True, strict=True)


@pytest.mark.parametrize("name", ["../../../etc", "evil/name", "a\x1b[2Jb.example", "x..y"])
def test_a_hostile_ptr_name_is_ignored_with_a_warning(tmp_path, name):
    (tmp_path / "etc").mkdir()
    resolver = FakeResolver({"192.0.2.1": name})
    rules = {"reversedns/@": {"allow": True}}
    with pytest.raises(Refused, match=r"no rule matches"):
        decide(rules, tmp_path / "rules", resolver)
    env, _, warnings = decide(resolver=resolver)
    assert env["TCPREMOTEHOST"] is None
    assert warnings == [f"ignoring the remote name of 192.0.2.1: not a host name: {name!r}"]


# -- the system resolver, on names every machine has ---------------------------------


def test_the_system_resolver_names_127_0_0_1_localhost_both_ways():
    resolver = SystemResolver(time.monotonic() + 10)
    assert resolver.name_of("127.0.0.1") == "localhost"
    assert "127.0.0.1" in resolver.addresses_of("localhost", 4)


def test_paranoid_against_the_system_resolver_keeps_localhost():
    resolver = SystemResolver()
    env, _, warnings = decide(resolver=resolver, remote="127.0.0.1", paranoid=True, localname="me")
    assert env["TCPREMOTEHOST"] == "localhost"
    assert warnings == []


def test_the_resolver_deadline_bounds_a_lookup(monkeypatch):
    def slow(ip):
        time.sleep(3)
        return ("late.example", [], [ip])

    monkeypatch.setattr(socket, "gethostbyaddr", slow)
    resolver = SystemResolver(time.monotonic() + 0.2)
    start = time.monotonic()
    with pytest.raises(LookupFailed, match=r"timed out"):
        resolver.name_of("127.0.0.1")
    assert time.monotonic() - start < 2


def test_a_passed_deadline_asks_nothing(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyaddr", lambda ip: pytest.fail("asked"))
    with pytest.raises(LookupFailed, match=r"timed out"):
        SystemResolver(time.monotonic() - 1).name_of("127.0.0.1")

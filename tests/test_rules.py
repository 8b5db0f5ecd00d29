"""s6's access rules: the keys, and the two stores (a directory, and the cdb s6 compiles).

Every ruleset is written as a directory, then compiled with Debian's real
``s6-accessrules-cdb-from-fs``; each test runs on both, and both must agree.
"""

import subprocess
from pathlib import Path

import pytest

from s6tls.errors import SystemFailure
from s6tls.net.rules import (
    Decision,
    Rule,
    RulesDirectory,
    RulesFile,
    apply_env,
    first_match,
    ip6_text,
    ip_keys,
    is_host_name,
    name_keys,
    parse_cdb_rule,
)


def write_rules(root: Path, rules: dict[str, dict]) -> None:
    """Make a rules directory: key -> {"allow"/"deny": True, "env": {...}, "exec": "..."}."""
    for key, spec in rules.items():
        d = root / key
        d.mkdir(parents=True)
        for verdict in ("allow", "deny"):
            if spec.get(verdict):
                (d / verdict).touch()
        if "env" in spec:
            (d / "env").mkdir()
            for name, value in spec["env"].items():
                (d / "env" / name).write_bytes(value)
        if "exec" in spec:
            (d / "exec").write_text(spec["exec"])


@pytest.fixture(params=["directory", "cdb"])
def store(request, tmp_path):
    """A function: rules dict -> a ruleset in the store under test."""

    def make(rules: dict[str, dict]):
        root = tmp_path / "rules"
        write_rules(root, rules)
        if request.param == "directory":
            return RulesDirectory(str(root))
        cdb = tmp_path / "rules.cdb"
        subprocess.run(["s6-accessrules-cdb-from-fs", str(cdb), str(root)], check=True, timeout=30)
        return RulesFile(str(cdb))

    return make


def test_ipv4_keys_go_from_the_address_to_the_whole_internet():
    keys = list(ip_keys("192.168.0.7"))
    assert len(keys) == 33
    assert keys[:4] == [
        "ip4/192.168.0.7_32",
        "ip4/192.168.0.6_31",
        "ip4/192.168.0.4_30",
        "ip4/192.168.0.0_29",
    ]
    assert "ip4/192.168.0.0_24" in keys
    assert keys[-2:] == ["ip4/128.0.0.0_1", "ip4/0.0.0.0_0"]


def test_ipv6_keys_go_from_the_address_to_the_whole_internet():
    keys = list(ip_keys("2001:db8::7"))
    assert len(keys) == 129
    assert keys[:2] == ["ip6/2001:db8::7_128", "ip6/2001:db8::6_127"]
    assert "ip6/2001:db8::_32" in keys
    assert "ip6/2001:d00::_24" in keys
    assert keys[-1] == "ip6/::_0"


@pytest.mark.parametrize(
    ("ip", "text"),
    [
        ("::", "::"),
        ("::1", "::1"),
        ("1::", "1::"),
        ("2001:db8::", "2001:db8::"),
        ("1:0:1:1:1:1:1:1", "1:0:1:1:1:1:1:1"),  # a single zero group stays
        ("1:0:0:1:0:0:0:1", "1:0:0:1::1"),  # the longest run
        ("1:0:0:1:1:0:0:1", "1::1:1:0:0:1"),  # the first of two equal runs
        ("::ffff:1.2.3.4", "::ffff:102:304"),  # never a dotted tail, as skalibs
        ("FE80::ABCD", "fe80::abcd"),
    ],
)
def test_ipv6_text_is_skalibs_form(ip, text):
    import ipaddress

    assert ip6_text(int(ipaddress.IPv6Address(ip))) == text


def test_name_keys_go_from_the_name_to_its_last_label_then_at():
    assert list(name_keys("Mail.Example.ORG.")) == [
        "reversedns/mail.example.org",
        "reversedns/example.org",
        "reversedns/org",
        "reversedns/@",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "../../etc",
        "a/b.example",
        "",
        ".",
        "a..b",
        "-a.example",
        "a-.example",
        "x" * 64 + ".org",
        "a b.example",
        "a\nb.example",
        "é.example",
        "*.example",
    ],
)
def test_a_name_that_is_not_a_host_name_never_becomes_a_key(name):
    assert not is_host_name(name)
    with pytest.raises(ValueError):
        list(name_keys(name))


def test_the_most_specific_rule_wins_allow_or_deny(store):
    rules = store(
        {
            "ip4/10.0.0.0_8": {"allow": True},
            "ip4/10.1.0.0_16": {"deny": True},
            "ip4/10.1.2.3_32": {"allow": True},
            "ip6/2001:db8::_32": {"deny": True},
            "ip6/::1_128": {"allow": True},
        }
    )

    def decide(ip):
        rule = first_match(rules, ip_keys(ip))
        return (rule.key, rule.decision) if rule else None

    assert decide("10.9.9.9") == ("ip4/10.0.0.0_8", Decision.ALLOW)
    assert decide("10.1.9.9") == ("ip4/10.1.0.0_16", Decision.DENY)
    assert decide("10.1.2.3") == ("ip4/10.1.2.3_32", Decision.ALLOW)
    assert decide("11.0.0.1") is None
    assert decide("2001:db8:ffff::1") == ("ip6/2001:db8::_32", Decision.DENY)
    assert decide("2001:db9::1") is None
    assert decide("::1") == ("ip6/::1_128", Decision.ALLOW)


def test_allow_wins_over_deny_in_one_rule(store):
    rules = store({"ip4/0.0.0.0_0": {"allow": True, "deny": True}})
    assert rules.lookup("ip4/0.0.0.0_0").decision is Decision.ALLOW


def test_an_allowing_rule_carries_env_and_exec(store):
    rules = store(
        {
            "reversedns/example.org": {
                "allow": True,
                "env": {
                    "GREETING": b"hello  \t\r\nsecond line\n",
                    "EMPTY_LINE": b"\n",
                    "UNSET_ME": b"",
                    "WITH_NUL": b"a\0b\n",
                    ".hidden": b"x\n",
                },
                "exec": "echo hi\n",
            }
        }
    )
    rule = rules.lookup("reversedns/example.org")
    assert rule.decision is Decision.ALLOW
    assert dict(rule.env) == {
        "GREETING": "hello",
        "EMPTY_LINE": "",
        "UNSET_ME": None,
        "WITH_NUL": "a\nb",
    }
    assert rule.exec == "echo hi\n"
    env = {"UNSET_ME": "x", "KEEP": "y"}
    apply_env(env, rule.env)
    assert env == {"KEEP": "y", "GREETING": "hello", "EMPTY_LINE": "", "WITH_NUL": "a\nb"}


def test_rule_names_that_are_not_canonical_never_match(store):
    """s6 compares names byte for byte: 010.0.0.1 or an uncompressed IPv6 is no rule."""
    rules = store(
        {
            "ip4/010.0.0.1_32": {"allow": True},
            "ip6/0:0:0:0:0:0:0:1_128": {"allow": True},
            "ip4/10.0.0.1": {"allow": True},
        }
    )
    assert first_match(rules, ip_keys("10.0.0.1")) is None
    assert first_match(rules, ip_keys("::1")) is None


def test_odd_file_names_in_the_rules_are_harmless(store, tmp_path):
    rules = store(
        {
            "ip4/127.0.0.1_32": {"allow": True, "env": {"A=B": b"x\n", "SP ACE": b"ok\n"}},
            "reversedns/x": {"deny": True},
        }
    )
    rule = rules.lookup("ip4/127.0.0.1_32")
    assert dict(rule.env) == {"SP ACE": "ok"}  # a name with '=' is skipped, as s6-envdir does


def test_a_rule_directory_without_allow_or_deny_is_no_rule(store):
    rules = store({"ip4/0.0.0.0_0": {"env": {"X": b"1\n"}}})
    assert rules.lookup("ip4/0.0.0.0_0") is None


def test_a_rule_that_is_a_file_not_a_directory_is_an_error(tmp_path):
    (tmp_path / "ip4").mkdir()
    (tmp_path / "ip4" / "0.0.0.0_0").write_text("allow\n")
    with pytest.raises(SystemFailure, match="unable to check rule"):
        RulesDirectory(str(tmp_path)).lookup("ip4/0.0.0.0_0")


@pytest.mark.parametrize("content", [b"", b"not a cdb at all, just text"])
def test_a_rules_file_that_is_no_cdb_is_refused(tmp_path, content):
    path = tmp_path / "rules.cdb"
    path.write_bytes(content)
    with pytest.raises(SystemFailure, match="unable to open rules file"):
        RulesFile(str(path))


def test_a_missing_rules_file_is_refused(tmp_path):
    with pytest.raises(SystemFailure, match="No such file"):
        RulesFile(str(tmp_path / "nope.cdb"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"D", Rule("k", Decision.DENY)),
        (b"A\x00\x00\x00\x00", Rule("k", Decision.ALLOW)),
        (b"A\x00\x04X=1\x00\x00\x00", Rule("k", Decision.ALLOW, (("X", "1"),))),
        (b"A\x00\x02X\x00\x00\x02ls", Rule("k", Decision.ALLOW, (("X", None),), "ls")),
        (b"Z", None),  # another letter is no rule, as in s6
    ],
)
def test_cdb_rule_values_decode(value, expected):
    assert parse_cdb_rule("k", value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"A\x00",
        b"A\x00\x09X=1\x00\x00\x00",  # env length past the end
        b"A\x00\x04X=1\x00\x00\x05ls",  # exec length past the end
        b"A\x00\x03X=1\x00\x00",  # env not NUL-terminated
        b"A\x00\x03=1\x00\x00\x00",  # empty name
        b"A" + b"\x00" * 9000,
    ],
)
def test_malformed_cdb_rule_values_are_errors(value):
    with pytest.raises(ValueError):
        parse_cdb_rule("k", value)

"""The configuration: environment and options in, a validated TlsConfig or one error out."""

import random

import pytest

from s6tls.errors import ConfigError, UsageError
from s6tls.net.rules import apply_env
from s6tls.serve.app import Inherited, application_env
from s6tls.tls.config import VARIABLES, Options, TlsConfig

SERVER = {"CERTFILE": "c.pem", "KEYFILE": "k.pem"}
CLIENT = {"CAFILE": "ca.pem"}


def server(env: dict[str, str], **opts: object) -> TlsConfig:
    return TlsConfig.from_env("server", {**SERVER, **env}, Options(**opts))  # type: ignore[arg-type]


def client(env: dict[str, str], **opts: object) -> TlsConfig:
    opts.setdefault("servername", "localhost")
    return TlsConfig.from_env("client", {**CLIENT, **env}, Options(**opts))  # type: ignore[arg-type]


def test_defaults_are_tls_1_2_to_1_3_with_forward_secret_aead_suites_only():
    cfg = server({})
    assert (cfg.min_version, cfg.max_version) == ("1.2", "1.3")
    suites = cfg.ciphers.split(":")
    assert suites and all(s.startswith("ECDHE-") for s in suites)
    assert all("GCM" in s or "CHACHA20-POLY1305" in s for s in suites)
    assert cfg.ciphersuites is None and cfg.groups is None and cfg.alpn == ()


def test_every_policy_variable_fills_its_field():
    env = {
        "TLS_MIN_VERSION": "1.3",
        "TLS_MAX_VERSION": "1.3",
        "TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_CIPHERSUITES": "TLS_AES_128_GCM_SHA256",
        "TLS_GROUPS": "X25519:P-256",
        "TLS_ALPN": "h2, http/1.1",
        "PSKFILE": "psk",
        "PSK_IDENTITY": "alice",
        "TLS_PEER_DNS": "Straße.example,a.example",
        "TLS_PEER_URI": "spiffe://example.org/ns/default/sa/web",
        "TLS_PEER_EMAIL": "a@b.example",
        "TLS_PEER_IP": "::1,127.0.0.1",
        "TLS_PEER_SPKI": "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        "CRLFILE": "crl.pem",
        "TLS_CRL_CHECK": "chain",
        "TLS_OCSP": "require",
        "TLS_SESSION_DIR": "/var/cache/s6tls",
        "KEYPASSFILE": "pass",
    }
    cfg = client(env)
    assert cfg.alpn == ("h2", "http/1.1")
    assert cfg.peer_dns == ("xn--strae-oqa.example", "a.example")
    assert cfg.peer_ip == ("::1", "127.0.0.1")
    assert (cfg.crl_check, cfg.ocsp, cfg.psk_identity) == ("chain", "require", "alice")
    assert cfg.session_dir == "/var/cache/s6tls" and cfg.keypassfile == "pass"


def test_a_program_ignores_the_variables_of_the_other_side():
    assert server({"TLS_OCSP": "maybe", "PSK_IDENTITY": "x:y"}).ocsp is None
    assert client({"OCSPFILE": "ocsp.der"}).ocspfile is None


@pytest.mark.parametrize(
    ("role", "env", "opts", "message"),
    [
        ("server", {"TLS_MIN_VERSION": "1.1"}, {}, "invalid TLS_MIN_VERSION: '1.1' is not 1.2"),
        ("server", {"TLS_MIN_VERSION": "1.3", "TLS_MAX_VERSION": "1.2"}, {}, "TLS_MIN_VERSION is"),
        (
            "server",
            {"TLS_CIPHERSUITES": "TLS_AES_128_GCM_SHA256 X"},
            {},
            "invalid TLS_CIPHERSUITES",
        ),
        ("server", {"TLS_GROUPS": "X25519,P-256"}, {}, "invalid TLS_GROUPS"),
        ("server", {"TLS_ALPN": "h2,,http/1.1"}, {}, "invalid TLS_ALPN"),
        ("server", {"TLS_ALPN": "h2\x1b"}, {}, "invalid TLS_ALPN"),
        ("server", {"TLS_PEER_DNS": "a..b"}, {"peer_verify": "required"}, "invalid TLS_PEER_DNS"),
        (
            "server",
            {"TLS_PEER_URI": "no-scheme"},
            {"peer_verify": "required"},
            "invalid TLS_PEER_URI",
        ),
        (
            "server",
            {"TLS_PEER_EMAIL": "nobody"},
            {"peer_verify": "required"},
            "invalid TLS_PEER_EMAIL",
        ),
        ("server", {"TLS_PEER_IP": "1.2.3"}, {"peer_verify": "required"}, "invalid TLS_PEER_IP"),
        ("server", {"TLS_PEER_SPKI": "abcd"}, {"peer_verify": "required"}, "invalid TLS_PEER_SPKI"),
        (
            "server",
            {"TLS_PEER_DNS": "a.example", "CAFILE": "ca.pem"},
            {"peer_verify": "optional"},
            "TLS_PEER_* allow-lists need -y",
        ),
        (
            "server",
            {"TLS_CRL_CHECK": "all"},
            {},
            "invalid TLS_CRL_CHECK: 'all' is not leaf or chain",
        ),
        ("server", {"TLS_CRL_CHECK": "leaf"}, {}, "TLS_CRL_CHECK needs CRLFILE"),
        ("server", {"CRLFILE": "a\nb"}, {}, "invalid CRLFILE: it holds a control character"),
        ("server", {"CRLFILE": "crl.pem"}, {}, "CRLFILE needs -Y or -y"),
        ("client", {"CRLFILE": "crl.pem"}, {"verify_cert": False}, "CRLFILE is not checked"),
        (
            "server",
            {"PSKFILE": "p", "TLS_CIPHERSUITES": "TLS_AES_256_GCM_SHA384"},
            {},
            "PSKFILE needs",
        ),
        ("client", {"TLS_OCSP": "yes"}, {}, "invalid TLS_OCSP: 'yes' is not require"),
        ("client", {"TLS_OCSP": "require"}, {"verify_cert": False}, "TLS_OCSP=require cannot"),
        ("client", {"PSK_IDENTITY": "alice"}, {}, "PSK_IDENTITY needs PSKFILE"),
        ("client", {"PSKFILE": "p", "PSK_IDENTITY": "a:b"}, {}, "invalid PSK_IDENTITY"),
        ("client", {}, {"servername": "a..b"}, "invalid server name 'a..b'"),
        ("client", {}, {"servername": "x" * 64 + ".example"}, "invalid server name"),
        ("client", {}, {"servername": "bad_name.example"}, "invalid server name"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_variable(role, env, opts, message):
    with pytest.raises(UsageError) as info:
        (server if role == "server" else client)(env, **opts)
    assert str(info.value).startswith(message)


def test_psk_replaces_certificates_and_trust_anchors():
    assert TlsConfig.from_env("server", {"PSKFILE": "p"}, Options()).keypair is None
    assert TlsConfig.from_env("client", {"PSKFILE": "p"}, Options()).cafile is None
    with pytest.raises(UsageError):
        TlsConfig.from_env("server", {}, Options())


def test_server_names_are_idna_2008_and_ip_literals_are_normalised():
    assert client({}, servername="Straße.DE.").servername == "xn--strae-oqa.de"
    assert client({}, servername="0:0::1").servername == "::1"
    assert client({}, servername="::1").servername_is_ip


def test_warnings_for_what_works_but_is_probably_a_mistake():
    assert server({"CERTFILE:a.example": "a", "KEYFILE:a.example": "b"}).warnings == (
        "the CERTFILE:name keypairs are ignored without -k 1 or -k 2",
    )
    assert server({"CERTFILE:a.example": "a", "KEYFILE:a.example": "b"}, sni_level=1).warnings == ()
    assert client({}, verify_cert=False).warnings == (
        "not verifying the server's certificate (--no-verify-cert)",
    )
    assert client({}, servername=None).warnings == (
        "the server's name is not checked, only its chain: use -k NAME to check it",
    )
    assert client({}).warnings == ()


def test_unpaired_sni_keypair_is_a_configuration_error():
    with pytest.raises(ConfigError):
        server({"KEYFILE:a.example": "k"}, sni_level=1)


def test_z_removes_every_policy_variable_from_the_application_environment():
    env = {v.name: "x" for v in VARIABLES} | {"CERTFILE:a": "c", "PATH": "/bin"}
    assert application_env(env, keep_secrets=False) == {"PATH": "/bin"}
    assert application_env(env, keep_secrets=True) == env


@pytest.mark.parametrize("keep", [False, True])
def test_a_workers_inherited_environment_is_the_scrubbed_one_each_connection_would_build(keep):
    """A worker scrubs its environment once; each connection's is still exactly what
    scrubbing ours after its variables and its rule's changes would give (order too)."""
    rng = random.Random(20261207)
    names = ["PATH", "HOME", "CERTFILE", "KEYFILE", "CERTFILE:a", "TLS_UID", "SSL_CIPHER",
             "SSL_PEER_CERT_HASH", "TCPREMOTEIP", "TCPCONNNUM", "X", "Y"]  # fmt: skip
    for _ in range(500):
        environ = {n: f"e{rng.randrange(9)}" for n in rng.sample(names, rng.randrange(8))}
        inherited = Inherited(environ, keep_secrets=keep)
        environ["LATER"] = "not read"  # read once: a later change is not seen
        for _ in range(3):
            added = {n: f"a{rng.randrange(9)}" for n in rng.sample(names, rng.randrange(4))}
            changes = [
                (rng.choice(names), rng.choice([None, "c"])) for _ in range(rng.randrange(5))
            ]
            expected = {**{k: v for k, v in environ.items() if k != "LATER"}, **added}
            apply_env(expected, changes)
            expected = application_env(expected, keep_secrets=keep)
            got = inherited.with_changes(added, changes)
            assert list(got.items()) == list(expected.items())


# -- DTLS ----------------------------------------------------------------------


def dtls(role: str, env: dict[str, str], **opts: object) -> TlsConfig:
    base = SERVER if role == "server" else {**CLIENT}
    return TlsConfig.from_env(role, {**base, **env}, Options(**opts), dtls=True)  # type: ignore[arg-type]


def test_dtls_is_version_1_2_with_the_tls_1_2_policy_and_its_own_defaults():
    cfg = dtls("server", {})
    assert cfg.dtls and (cfg.min_version, cfg.max_version) == ("1.2", "1.2")
    assert cfg.ciphers == server({}).ciphers
    assert (cfg.dtls_mtu, cfg.dtls_timeout_min, cfg.dtls_timeout_max) == (1232, 1000, 60000)
    assert not server({}).dtls


def test_every_dtls_variable_fills_its_field_and_tls_programs_ignore_them():
    env = {
        "DTLS_MTU": "1400",
        "DTLS_HANDSHAKE_TIMEOUT_MIN": "2500",
        "DTLS_HANDSHAKE_TIMEOUT_MAX": "90000",
    }
    cfg = dtls("client", env)
    assert (cfg.dtls_mtu, cfg.dtls_timeout_min, cfg.dtls_timeout_max) == (1400, 2500, 90000)
    plain = client({**env, "DTLS_MTU": "not even a number"})
    assert (plain.dtls_mtu, plain.dtls_timeout_min) == (1232, 1000)


def test_dtls_psk_offers_the_tls_1_2_psk_suites_first_unless_told_otherwise():
    cfg = dtls("server", {"PSKFILE": "p"})
    assert cfg.ciphers.startswith("ECDHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256")
    assert cfg.ciphers.endswith(server({}).ciphers)
    assert dtls("server", {"PSKFILE": "p", "TLS_CIPHERS": "PSK-AES128-CCM8"}).ciphers == (
        "PSK-AES128-CCM8"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_MAX_VERSION": "1.3"}, "DTLS is 1.2 only"),
        ({"TLS_MIN_VERSION": "1.3"}, "DTLS is 1.2 only"),
        ({"DTLS_MTU": "255"}, "invalid DTLS_MTU: '255' is not a number from 256 to 65507"),
        ({"DTLS_MTU": "65508"}, "invalid DTLS_MTU"),
        ({"DTLS_MTU": "1e3"}, "invalid DTLS_MTU"),
        ({"DTLS_HANDSHAKE_TIMEOUT_MIN": "999"}, "invalid DTLS_HANDSHAKE_TIMEOUT_MIN: '999'"),
        ({"DTLS_HANDSHAKE_TIMEOUT_MAX": "59999"}, "invalid DTLS_HANDSHAKE_TIMEOUT_MAX: '59999'"),
        (
            {"DTLS_HANDSHAKE_TIMEOUT_MIN": "70000", "DTLS_HANDSHAKE_TIMEOUT_MAX": "60000"},
            "DTLS_HANDSHAKE_TIMEOUT_MIN is above DTLS_HANDSHAKE_TIMEOUT_MAX",
        ),
    ],
)
def test_a_bad_dtls_value_is_a_usage_error_naming_the_variable(env, message):
    with pytest.raises(UsageError) as info:
        dtls("server", env)
    assert str(info.value).startswith(message)


def test_dtls_warns_about_what_it_does_not_use():
    env = {"TLS_CIPHERSUITES": "TLS_AES_128_GCM_SHA256", "TLS_SESSION_DIR": "/tmp"}
    cfg = dtls("client", env, servername="localhost")
    assert cfg.warnings == (
        "TLS_CIPHERSUITES is not used: DTLS 1.2 takes its suites from TLS_CIPHERS",
        "TLS_SESSION_DIR is not used by DTLS",
    )
    assert cfg.session_dir is None


def test_z_removes_the_dtls_variables_too():
    env = {"DTLS_MTU": "1400", "DTLS_HANDSHAKE_TIMEOUT_MIN": "1000", "PATH": "/bin"}
    assert application_env(env, keep_secrets=False) == {"PATH": "/bin"}

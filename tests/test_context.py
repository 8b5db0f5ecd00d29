"""Contexts from configurations, in-process: warnings, the ticket key, its rotation."""

import os
from pathlib import Path

import pytest
from tls_pair import connections, exchange, handshake

from s6tls.errors import UsageError
from s6tls.tls import context as context
from s6tls.tls import ossl as ossl
from s6tls.tls.config import Options, TlsConfig
from s6tls.tls.context import Contexts, build_context


def server_cfg(pki, **env: str) -> TlsConfig:
    base = {"CERTFILE": pki["server_cert"], "KEYFILE": pki["server_key"]}
    return TlsConfig.from_env("server", {**base, **env}, Options())


def client_cfg(pki, **env: str) -> TlsConfig:
    return TlsConfig.from_env(
        "client", {"CAFILE": pki["ca"], **env}, Options(servername="localhost")
    )


def session_after_one_connection(server_ctx, client_ctx) -> bytes:
    s, c = connections(server_ctx, client_ctx)
    assert handshake(s, c) == (None, None)
    assert exchange(s, c, b"with the tickets") == b"with the tickets"
    der = ossl.session_to_der(c)
    assert der
    return der


def resumes(server_ctx, client_ctx, der: bytes) -> bool:
    s, c = connections(server_ctx, client_ctx)
    assert ossl.use_session_der(c, der)
    assert handshake(s, c) == (None, None)
    return ossl.session_reused(s)


def test_the_ticket_key_is_replaced_every_12_hours_and_on_reload(pki, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(context.time, "monotonic", lambda: now[0])
    warnings: list[str] = []
    contexts = Contexts(server_cfg(pki), warnings.append, tickets=True)
    client = build_context(client_cfg(pki))
    der = session_after_one_connection(contexts.context, client)
    assert resumes(contexts.context, client, der)
    now[0] += context.TICKET_KEY_LIFETIME - 1
    assert contexts.seconds_to_rotation() == 1
    assert not contexts.rotate_if_due()
    now[0] += 1
    assert contexts.rotate_if_due()
    assert not resumes(contexts.context, client, der)
    assert contexts.seconds_to_rotation() == context.TICKET_KEY_LIFETIME
    der = session_after_one_connection(contexts.context, client)
    contexts.reload()
    assert not resumes(contexts.context, client, der)
    assert warnings == []


def test_a_context_built_for_one_connection_issues_no_tls_1_2_ticket(pki):
    cfg = client_cfg(pki, TLS_MAX_VERSION="1.2")
    client = build_context(cfg)
    server = build_context(server_cfg(pki))
    der = session_after_one_connection(server, client)
    assert not resumes(server, client, der)
    ticketing = context.make_context(
        server_cfg(pki), context.load_credentials(server_cfg(pki)), tickets=True
    )
    der = session_after_one_connection(ticketing, client)
    assert resumes(ticketing, client, der)


def test_warnings_about_the_files_go_to_warn(pki, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(Path(pki["server_key"]).read_bytes())
    os.chmod(key, 0o644)
    cfg = TlsConfig.from_env(
        "server",
        {"CERTFILE": pki["server_cert"], "KEYFILE": str(key), "CERTFILE:x": "c", "KEYFILE:x": "k"},
        Options(),
    )
    warnings: list[str] = []
    build_context(cfg, warnings.append)
    assert warnings == [
        f"KEYFILE {key} is readable by group or others (mode 0644): chmod go-rwx it",
    ]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_both_sides_agree_on_the_default_policy(pki, version):
    server = build_context(server_cfg(pki, TLS_MAX_VERSION=version))
    client = build_context(client_cfg(pki))
    s, c = connections(server, client)
    assert handshake(s, c) == (None, None)
    assert c.get_protocol_version_name() == f"TLSv{version}"
    if ossl.has_group(ossl.HYBRID_GROUP) and version == "1.3":
        assert c.get_group_name() == ossl.HYBRID_GROUP


@pytest.mark.parametrize(
    ("env", "sni_level", "dtls", "refused"),
    [
        ({"TLS_CIPHERS": "eNULL"}, 0, False, "CERTFILE @ecdsa"),
        ({"TLS_CIPHERS": "eNULL"}, 0, True, "CERTFILE @ecdsa"),
        ({"TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256"}, 0, False, "CERTFILE @ecdsa"),
        ({"TLS_CIPHERS": "eNULL", "TLS_MIN_VERSION": "1.3"}, 0, False, None),  # no TLS 1.2
        ({"TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256", "CERTFILE": "@rsa"}, 0, False, None),
        (
            {"TLS_CIPHERS": "ECDHE-ECDSA-AES128-GCM-SHA256", "CERTFILE:r.example": "@rsa"},
            1,
            False,
            "r",
        ),
        (
            {"TLS_CIPHERS": "ECDHE-ECDSA-AES128-GCM-SHA256", "CERTFILE:*.example": "@rsa"},
            2,
            True,
            "*",
        ),
        ({"PSKFILE": "@psk", "CERTFILE": ""}, 0, False, None),  # TLS 1.2's PSK suites by default
        ({"PSKFILE": "@psk", "CERTFILE": ""}, 0, True, None),
        (
            {"PSKFILE": "@psk", "CERTFILE": "", "TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256"},
            0,
            False,
            "P",
        ),
    ],
)
def test_tls_ciphers_that_leave_a_keypair_no_tls_1_2_suite_are_refused_naming_it(
    env, sni_level, dtls, refused, pki, rsa_keypair, pskfile
):
    files = {"@ecdsa": pki["server_cert"], "@rsa": rsa_keypair[0], "@psk": pskfile}
    keys = {pki["server_cert"]: pki["server_key"], rsa_keypair[0]: rsa_keypair[1]}
    full = {"CERTFILE": "@ecdsa", **env}
    full = {name: files.get(value, value) for name, value in full.items() if value}
    for name in [n for n in full if n.startswith("CERTFILE")]:
        full["KEY" + name[4:]] = keys[full[name]]
    cfg = TlsConfig.from_env("server", full, Options(sni_level=sni_level), dtls=dtls)
    if refused is None:
        Contexts(cfg)
        return
    what = {"r": "CERTFILE:r.example", "*": "CERTFILE:*.example", "P": f"PSKFILE {pskfile}"}
    with pytest.raises(UsageError) as info:
        Contexts(cfg)
    expected = what.get(refused, refused.replace("@ecdsa", pki["server_cert"]))
    assert str(info.value).startswith(
        f"invalid TLS_CIPHERS: none of its TLS 1.2 suites can be used with {expected}:"
    )

"""What the kernel TLS tests share: the suites, and contexts that report their keys."""

from OpenSSL import SSL

from s6tls import ktls_keys

TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
# trustme's certificates have ECDSA keys.
TLS12_CIPHERS = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
]


def watched_contexts(
    pki: dict[str, str], version: int, cipher: str | None, *, watch: bool = True
) -> tuple[SSL.Context, SSL.Context]:
    """A server and a client context limited to ``version`` and ``cipher``.

    ``version`` is ``ktls_keys.TLS_1_2_VERSION`` or ``TLS_1_3_VERSION``; with
    ``watch``, both contexts remember what ``ktls_keys.connection_keys`` needs.
    """
    proto = SSL.TLS1_3_VERSION if version == ktls_keys.TLS_1_3_VERSION else SSL.TLS1_2_VERSION
    server = SSL.Context(SSL.TLS_METHOD)
    server.use_certificate_chain_file(pki["server_cert"])
    server.use_privatekey_file(pki["server_key"])
    client = SSL.Context(SSL.TLS_METHOD)
    for ctx in (server, client):
        ctx.set_min_proto_version(proto)
        ctx.set_max_proto_version(proto)
        if cipher and version == ktls_keys.TLS_1_3_VERSION:
            ctx.set_tls13_ciphersuites(cipher.encode())
        elif cipher:
            ctx.set_cipher_list(cipher.encode())
        if watch:
            ktls_keys.watch_context(ctx)
    return server, client

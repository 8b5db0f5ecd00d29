"""Configuration and everything OpenSSL: from the environment to a finished handshake.

``config`` validates the environment and options into a ``TlsConfig``;
``credentials`` reads the files it names; ``context`` builds the pyOpenSSL
contexts; ``handshake`` runs a handshake under ``-K`` and states its facts;
``peer`` checks the peer's certificate, ``sessions`` keeps a client's
sessions, ``ocsp`` checks staples; ``ossl`` is the binding pyOpenSSL does not
wrap, ``reasons`` words its errors; ``pki`` makes throw-away certificates.
"""

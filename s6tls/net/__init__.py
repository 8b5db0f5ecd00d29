"""What comes before TLS and around sockets.

``names`` (host names, IP literals) and ``ucspi`` (what a super-server
hands over) serve every program; ``systemd`` (socket activation,
readiness) and ``listen`` (the servers' own sockets) the servers;
``gate`` is s6-tlsserver before TLS: banner, ``proxyproto`` header, and the
access rules (``access`` over ``rules`` and ``resolver``); ``dialer`` is
s6-tlsclient's connect.
"""

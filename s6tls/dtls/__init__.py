"""DTLS: the stateless ``cookie`` exchange of a server, and the ``link`` on a UDP socket."""

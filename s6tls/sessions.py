"""TLS_SESSION_DIR: sessions a client keeps so that its next process resumes them.

One file per server name and port, ``NAME:PORT`` (``NAME`` alone when the
port is unknown), written atomically with mode 0600.  Its first line names
the format and a digest of everything that decides whether the server was
acceptable (server name, trust anchors, CRLs, allow-lists, OCSP): a session
is offered only to a client that checks the server exactly as the one that
made it did, since a resumed handshake checks nothing again.

The client context's info callback (``on_info``) keeps the newest session:
under TLS 1.2 the one the handshake made, under TLS 1.3 each one a
NewSessionTicket brings after the handshake.
"""

import contextlib
import hashlib
import os
import tempfile

from OpenSSL import SSL

from . import ossl
from .config import TlsConfig
from .errors import ConfigError

MAGIC = b"s6tls-session 1 "


class SessionStore:
    """The file of one server under TLS_SESSION_DIR."""

    def __init__(self, directory: str, server: str, policy: str) -> None:
        self.path = os.path.join(directory, server)
        self.directory = directory
        self.header = MAGIC + policy.encode("ascii") + b"\n"

    @classmethod
    def for_config(cls, cfg: TlsConfig) -> "SessionStore":
        """The store for ``cfg``'s server name and port; ``cfg.session_dir`` must be set."""
        assert cfg.session_dir and cfg.servername
        server = cfg.servername + (f":{cfg.server_port}" if cfg.server_port else "")
        checks = (
            cfg.servername,
            cfg.options.verify_cert,
            cfg.cafile,
            cfg.cadir,
            cfg.crlfile,
            cfg.crl_check,
            cfg.peer_dns,
            cfg.peer_uri,
            cfg.peer_email,
            cfg.peer_ip,
            cfg.peer_spki,
            cfg.ocsp,
            cfg.pskfile,
            cfg.psk_identity,
        )
        policy = hashlib.sha256(repr(checks).encode()).hexdigest()[:32]
        return cls(cfg.session_dir, server, policy)

    def load(self) -> bytes | None:
        """The kept session's DER, or None (no file, another policy, unreadable)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        return data[len(self.header) :] if data.startswith(self.header) else None

    def save(self, der: bytes) -> None:
        """Replace the kept session with ``der``; a failure leaves the old one (best effort)."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".session-")
            with os.fdopen(fd, "wb") as f:
                f.write(self.header + der)
            os.replace(tmp, self.path)
        except OSError:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def attach(self, conn: SSL.Connection) -> None:
        """Offer the kept session, if any, in ``conn``'s handshake."""
        der = self.load()
        if der is not None:
            ossl.use_session_der(conn, der)


def check_directory(path: str) -> None:
    """Raise ``ConfigError`` unless ``path`` is a directory we can write sessions into."""
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"TLS_SESSION_DIR {path} is not a directory s6tls can write to")


class SessionKeeper:
    """Per connection: the session last kept, and where to keep the next."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.handshake_done = False
        self.kept: bytes | None = None  # DER of the session last written (or not worth it)

    def on_info(self, conn: SSL.Connection, where: int) -> None:
        """Called from the info callback: keep each new resumable session.

        After the handshake, OpenSSL reports only post-handshake messages
        (a TLS 1.3 client's tickets, a key update): compare the session's
        DER with the last one kept and write it when it changed.
        """
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.handshake_done = True
            if conn.get_protocol_version_name() == "TLSv1.3":
                self.kept = ossl.session_to_der(conn)  # no ticket yet: not resumable
                return
        if not self.handshake_done or not where & (SSL.SSL_CB_EXIT | SSL.SSL_CB_HANDSHAKE_DONE):
            return
        der = ossl.session_to_der(conn)
        if der and der != self.kept:
            self.store.save(der)
            self.kept = der

"""TLS_SESSION_DIR: sessions a client keeps so that its next process resumes them.

One file per server name and port, ``NAME:PORT`` (``NAME`` alone when the
port is unknown), written atomically with mode 0600.  Its first line names
the format and a digest of everything that decides whether the server was
acceptable (server name, trust anchors, CRLs, allow-lists, OCSP): a session
is offered only to a client that checks the server exactly as the one that
made it did, since a resumed handshake checks nothing again.

The session is kept when the connection ends: under TLS 1.3 the server's
tickets arrive after the handshake, with the data (an info callback cannot
watch for them: the engine owns the connection's).
"""

import contextlib
import hashlib
import os
import tempfile

from OpenSSL import SSL

from ..errors import ConfigError
from . import ossl
from .config import TlsConfig

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

    def save(self, der: bytes) -> str | None:
        """Replace the kept session with ``der``; None, or why it could not (the old one stays)."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".session-")
            with os.fdopen(fd, "wb") as f:
                f.write(self.header + der)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return f"unable to keep the session in {self.directory}: {exc.strerror}"
        return None

    def attach(self, conn: SSL.Connection) -> None:
        """Offer the kept session, if any, in ``conn``'s handshake."""
        der = self.load()
        if der is not None:
            ossl.use_session_der(conn, der)

    def keep(self, conn: SSL.Connection) -> str | None:
        """Keep ``conn``'s session (the newest ticket it received) for the next process.

        Returns None, or why it could not.
        """
        der = ossl.session_to_der(conn)
        return self.save(der) if der else None


def check_directory(path: str) -> None:
    """Raise ``ConfigError`` unless ``path`` is a directory we can write sessions into.

    Asked with the effective ids (``serve.privileges.as_ids`` sets them to
    those the sessions will be written as).
    """
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        raise ConfigError(f"TLS_SESSION_DIR {path} is not a directory s6tls can write to")

"""A program once started: its ``Setup``, and the connection it serves.

``program.start`` builds the ``Setup`` (the configuration, the contexts,
the ids, the application); a program's network side then calls
``serve_connection`` for each connection it serves, in its own process or
in a forked child: privileges are dropped, then ``tunnel`` serves the
connection.
"""

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cli import Log
from ..net.ucspi import peer_address, unmap
from ..options import Settings
from ..tls.config import TlsConfig
from .privileges import Ids, drop_privileges

if TYPE_CHECKING:
    import socket

    from OpenSSL import SSL

    from ..tls.context import Contexts


@dataclass(frozen=True)
class Setup:
    """Everything a program's network side needs, checked and built."""

    log: Log
    cfg: TlsConfig
    app: tuple[str, ...]
    settings: Settings
    # The process's environment (os.environ), the application's to be; what the
    # configuration was read from.  A program reads and writes it through here.
    environ: MutableMapping[str, str]
    ids: Ids
    contexts: "Contexts"

    @property
    def ctx(self) -> "SSL.Context":
        """The current context: ``contexts.context`` (a reload or a rotation replaces it)."""
        return self.contexts.context

    def drop_privileges(self) -> None:
        """Become the ids asked for (checked at start); after the keys, before a handshake."""
        drop_privileges(self.ids)

    def serve_connection(
        self,
        rfd: int,
        wfd: int,
        *,
        app_fds: tuple[int, int],
        peer: str,
        extra_env: Mapping[str, str] | None = None,
        on_handshake: Callable[[], None] | None = None,
        hello: bytes | None = None,
    ) -> int:
        """Drop privileges, then ``tunnel.serve_connection`` for this program.

        This process now serves this connection: every line of its log, the
        fatal line that ends it included, names ``peer IP:PORT pid N``.
        """
        from .tunnel import serve_connection  # the TLS modules: only once the setup is good

        log = self.log.about(peer, os.getpid())
        self.log.prefix = log.prefix
        self.drop_privileges()
        return serve_connection(
            self.cfg,
            self.ctx,
            rfd,
            wfd,
            self.app,
            log,
            app_fds=app_fds,
            environ=self.environ,
            extra_env=extra_env,
            on_handshake=on_handshake,
            hello=hello,
        )

    def serve_connected(self, sock: "socket.socket", extra_env: Mapping[str, str]) -> int:
        """A client's connected socket: serve it (``serve_connection``), prog on -6/-7."""
        remote = sock.getpeername()
        fd = sock.detach()
        return self.serve_connection(
            fd,
            fd,
            app_fds=self.cfg.options.app_fds,
            peer=peer_address(unmap(remote[0]), remote[1]),
            extra_env=extra_env,
        )

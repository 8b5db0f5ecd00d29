"""The application: its environment, its descriptors, its spawning and its status."""

import fcntl
import os
import signal
from collections.abc import Iterator, Mapping, Sequence

from ..net.rules import apply_env
from ..tls.config import is_secret_variable

# Variables s6tls writes for the application; stale copies are always removed.
TLS_FACTS = (
    "SSL_PROTOCOL",
    "SSL_CIPHER",
    "SSL_TLS_SNI_SERVERNAME",
    "SSL_PEER_CERT_HASH",
    "SSL_PEER_CERT_SUBJECT",
    "SSL_SESSION_RESUMED",
    "SSL_ALPN_PROTOCOL",
    "SSL_PSK_IDENTITY",
    "SSL_PEER_CERT_SAN_DNS",
    "SSL_PEER_CERT_SAN_URI",
    "SSL_PEER_CERT_SAN_EMAIL",
    "SSL_PEER_CERT_SAN_IP",
    "SSL_PEER_CERT_SPKI",
    "SSL_PEER_CERT_NOT_AFTER",
    "SSL_DTLS_MAX_DATAGRAM",
)


def kept(name: str, *, keep_secrets: bool) -> bool:
    """True if the application may inherit variable ``name`` from us.

    Not a TLS fact (s6tls writes those); under -z (``keep_secrets`` False),
    not a secret (``tls.config.is_secret_variable``).
    """
    return name not in TLS_FACTS and (keep_secrets or not is_secret_variable(name))


def application_env(
    environ: Mapping[str, str], *, keep_secrets: bool, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The application's environment but its TLS facts: ours, scrubbed under -z, and ``extra``.

    Any ``SSL_*`` fact inherited from our own environment is dropped, so a
    variable the spec says is unset (no SNI, no peer certificate) is really
    unset once the connection's facts are added (``tunnel.start_application``).
    """
    env = {k: v for k, v in environ.items() if kept(k, keep_secrets=keep_secrets)}
    env.update(extra or {})
    return env


class Inherited:
    """What a long-lived server's applications inherit from its environment, scrubbed once.

    ``environ`` is read when this is made (a worker's environment does not
    change afterwards): each connection then copies a plain dict instead of
    decoding and scrubbing the whole process environment.
    """

    def __init__(self, environ: Mapping[str, str], *, keep_secrets: bool) -> None:
        self.keep_secrets = keep_secrets
        self.base = application_env(environ, keep_secrets=keep_secrets)

    def with_changes(
        self, added: Mapping[str, str], changes: Sequence[tuple[str, str | None]]
    ) -> dict[str, str]:
        """Ours with ``added`` set, then ``changes`` applied in order (value None: unset).

        Scrubbed as ``application_env`` scrubs: the same as scrubbing our
        environment after setting and changing it.
        """
        keep = self.keep_secrets
        env = dict(self.base)
        env.update({k: v for k, v in added.items() if kept(k, keep_secrets=keep)})
        apply_env(env, [(k, v) for k, v in changes if kept(k, keep_secrets=keep)])
        return env


def spawn(argv: Sequence[str], env: Mapping[str, str], fdmap: Mapping[int, int]) -> int:
    """Start ``argv`` (searched in PATH) with ``fdmap``'s sources on its target fds.

    ``fdmap`` maps our descriptor to the number the application sees.  Every
    other descriptor of ours that is close-on-exec stays ours; stdin, stdout
    and stderr are inherited unless mapped.  SIGPIPE and SIGXFSZ, which Python
    ignores, are reset to their defaults.  Returns the pid.

    Raises ``OSError`` if the program cannot be started.
    """
    # A source may sit on another mapping's target: move every source out of
    # the way first, above all targets, so one dup2 cannot clobber the next.
    floor = max(fdmap.values(), default=2) + 1
    moved = {
        src if src >= floor else fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, floor): dst
        for src, dst in fdmap.items()
    }
    try:
        actions = [(os.POSIX_SPAWN_DUP2, src, dst) for src, dst in moved.items()]
        return os.posix_spawnp(
            argv[0],
            list(argv),
            env,
            file_actions=actions,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        for src in moved:
            if src not in fdmap:
                os.close(src)


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, reaped now, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def exit_code(status: int) -> int:
    """The exit code that passes on a wait status: the code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)

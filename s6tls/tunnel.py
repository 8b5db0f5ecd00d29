"""One connection from start to end: handshake, spawn, pump, status.

This is the common core of the four programs: s6-tlsd and s6-tlsc call it
once on the descriptors they were given, s6-tlsserver calls it in each
forked child, s6-tlsclient once on the socket it connected.
"""

import os
import socket
from collections.abc import Mapping, Sequence

from OpenSSL import SSL

from .app import application_env, exit_code, spawn
from .cli import Log
from .config import TlsConfig
from .context import VerifyNotes
from .engine import run
from .errors import HandshakeError, SystemFailure
from .handshake import connection_facts, handshake
from .link import new_connection
from .pump import Stats
from .selfpipe import SelfPipe


def drop_privileges(cfg: TlsConfig) -> None:
    """Become TLS_GID/TLS_UID when set (non-zero) and we are root.

    Called after the keys are read and before the handshake.  Raises
    ``SystemFailure`` if the kernel refuses.

    The modules a connection imports lazily are imported first: the new
    user may not be allowed to read the Python installation (one under a
    0700 home, for instance), and an import failing mid-handshake would
    turn into a misleading error.
    """
    if os.geteuid() != 0 or not (cfg.uid or cfg.gid):
        return
    import encodings.idna  # noqa: F401  (the client's SNI name is encoded with it)

    if cfg.role == "client" and cfg.verify_peer != "none":
        import service_identity.cryptography  # noqa: F401  (context.check_name)
    try:
        if cfg.gid:
            os.setgroups([cfg.gid])
            os.setgid(cfg.gid)
        if cfg.uid:
            os.setuid(cfg.uid)
    except OSError as exc:
        raise SystemFailure(f"unable to drop privileges: {exc.strerror}") from None


def serve_connection(
    cfg: TlsConfig,
    ctx: SSL.Context,
    rfd: int,
    wfd: int,
    prog: Sequence[str],
    log: Log,
    *,
    app_fds: tuple[int, int],
    environ: Mapping[str, str],
    extra_env: Mapping[str, str] | None = None,
    peer: str = "",
) -> int:
    """Run one TLS connection on ``rfd``/``wfd`` for ``prog``; return the exit code.

    The handshake comes first, with every check of the peer; only then is
    ``prog`` spawned, with the cleartext pipes on ``app_fds`` (read, write)
    and the TLS facts in its environment.  The engine then pumps until the
    end, and the exit code is prog's (128 + signal if it was killed).

    Takes ownership of ``rfd`` and ``wfd`` once the handshake succeeded.
    Raises ``HandshakeError`` (97), ``HandshakeTimeout``/``TlsRuntimeError``
    (98), ``SystemFailure`` (111).
    """
    opts = cfg.options
    for fd in {rfd, wfd}:
        os.set_inheritable(fd, False)  # the application never sees the network
    conn = new_connection(ctx, rfd, wfd)
    notes = VerifyNotes()
    conn.set_app_data(notes)
    if cfg.role == "client":
        name = opts.servername
        if name and not cfg.servername_is_ip:
            conn.set_tlsext_host_name(name.encode("idna"))
        if name and cfg.verify_peer != "none":
            notes.hostname = name
        conn.set_connect_state()
    else:
        conn.set_accept_state()
    try:
        handshake(conn, rfd, wfd, opts.handshake_timeout_ms)
    except HandshakeError as exc:
        if notes.reasons:
            raise HandshakeError(f"{notes.reasons[0]} ({exc})") from None
        raise
    facts = connection_facts(conn)
    env = application_env(environ, facts, keep_secrets=opts.keep_env, extra=extra_env)
    stats = Stats()
    with SelfPipe() as selfpipe:
        to_app_r, to_app_w = os.pipe()
        from_app_r, from_app_w = os.pipe()
        try:
            pid = spawn(prog, env, {to_app_r: app_fds[0], from_app_w: app_fds[1]})
        except OSError as exc:
            for fd in (to_app_r, to_app_w, from_app_r, from_app_w):
                os.close(fd)
            raise SystemFailure(f"unable to spawn {prog[0]}: {exc.strerror}") from None
        os.close(to_app_r)
        os.close(from_app_w)
        status = run(
            conn,
            (from_app_r, to_app_w, rfd, wfd, selfpipe.fileno()),
            pid,
            close_notify=opts.close_notify,
            strict_close_notify=opts.strict_close_notify,
            idle_timeout=opts.idle_timeout,
            stats=stats,
        )
        if status is None:
            _, status = os.waitpid(pid, 0)
    code = exit_code(status)
    sni = facts.get("SSL_TLS_SNI_SERVERNAME", "-")
    log.info(
        f"peer {peer or '-'} sni {sni} {facts['SSL_PROTOCOL']} {facts['SSL_CIPHER']}"
        f" in {stats.to_app} out {stats.to_peer} closed by {stats.ending} status {code}"
    )
    return code


def describe_peer(fd: int, environ: Mapping[str, str]) -> str:
    """``ip:port`` of the peer, from the UCSPI variables or from the socket."""
    if environ.get("TCPREMOTEIP"):
        return f"{environ['TCPREMOTEIP']}:{environ.get('TCPREMOTEPORT', '?')}"
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return ""
    with sock:
        try:
            host, port = sock.getpeername()[:2]
        except (OSError, ValueError, TypeError):
            return ""
    return f"{host}:{port}"


def check_fds(fds: Sequence[int], what: str) -> None:
    """Raise ``SystemFailure`` (111) unless every fd in ``fds`` is open.

    111, not 100: the contract is silent here, and skarnet's s6-tlsc dies
    with 111 ("unable to check network fds") in this case.
    """
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise SystemFailure(f"{what}: descriptor {fd}: {exc.strerror}") from None

"""One connection from start to end: handshake, spawn, pump, status.

This is the common core of the programs: s6-tlsd and s6-tlsc call it
once on the descriptors they were given, s6-tlsserver and s6-dtlsserver in
each forked child, s6-tlsclient and s6-dtlsclient once on the socket they
connected.  Under DTLS (``cfg.dtls``) the link is a ``dtls.link`` on a
connected UDP socket, and the application gets one end of a
``SOCK_SEQPACKET`` socketpair on both of its descriptors, one datagram per
message each way.
"""

import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL

from ..cli import Log
from ..engine import run
from ..errors import HandshakeError, S6tlsError, SystemFailure
from ..lifetime import Stats
from ..link import Link, new_link
from ..selfpipe import SelfPipe
from ..tls.config import TlsConfig
from ..tls.context import VerifyNotes, keep_session, prepare_connection
from ..tls.handshake import connection_facts, handshake
from .app import application_env, exit_code, spawn

# Signals passed on to the application while it runs; SIGCHLD reports its exit.
PASSED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def open_link(
    cfg: TlsConfig,
    ctx: SSL.Context,
    rfd: int,
    wfd: int,
    hello: bytes | None = None,
    sock: socket.socket | None = None,
) -> Link:
    """The link of a connection on ``rfd``/``wfd``, ready for its handshake.

    The link owns both descriptors from now on (and ``sock``, their socket
    object if the caller has one: ``link.new_link``).  Under DTLS, ``rfd``
    is the connected UDP socket and ``hello`` the ClientHello a server's
    listener verified.  Raises ``OSError`` if a descriptor cannot be used.
    """
    if cfg.dtls:
        from ..dtls.link import datagram_link

        link: Link = datagram_link(cfg, ctx, rfd, hello)
    else:
        link = new_link(ctx, rfd, wfd, sock)
    prepare_connection(cfg, link.conn)
    if cfg.options.ktls:
        from ..ktls.keys import HandshakeWatch  # only then: it costs start-up time

        link.handshake_watch = HandshakeWatch()
    return link


def handshake_failed(link: Link, exc: S6tlsError) -> S6tlsError:
    """Close ``link`` after its handshake failed with ``exc``; the error to report.

    The link's descriptors are closed (after our alert, a FIN).  A
    ``HandshakeError`` names why the peer was rejected when one of our
    checks rejected it (``VerifyNotes.refusal``).
    """
    notes = link.conn.get_app_data()
    link.close()
    if isinstance(exc, HandshakeError) and isinstance(notes, VerifyNotes):
        refusal = notes.refusal(str(exc))
        if refusal:
            return HandshakeError(refusal)
    return exc


def establish(
    cfg: TlsConfig, ctx: SSL.Context, rfd: int, wfd: int, hello: bytes | None = None
) -> Link:
    """The handshake on ``rfd``/``wfd``, with every check of the peer; the link.

    ``open_link``, then ``handshake`` under -K.  If the handshake fails the
    descriptors are closed (``handshake_failed``).  Raises
    ``HandshakeError`` (97, naming why the peer was rejected when we
    rejected it) and ``HandshakeTimeout`` (98, -K).
    """
    link = open_link(cfg, ctx, rfd, wfd, hello)
    try:
        handshake(link, cfg.options.handshake_timeout_ms)
    except S6tlsError as exc:
        raise handshake_failed(link, exc) from None
    return link


@dataclass
class Application:
    """The application of a connection, once spawned: its pid, our ends of its descriptors.

    ``ours`` is (its output, for us to read; its input, for us to write):
    two pipes, or one socket twice (datagrams).  ``facts`` are the ``SSL_*``
    variables it was given.
    """

    pid: int
    ours: tuple[int, int]
    facts: dict[str, str]


def start_application(
    cfg: TlsConfig,
    link: Link,
    prog: Sequence[str],
    env: Mapping[str, str],
    app_fds: tuple[int, int],
) -> Application:
    """Spawn ``prog`` for ``link``, whose handshake is done: the TLS facts in its environment.

    Its cleartext is on ``app_fds`` (read, write); its environment is
    ``env`` (scrubbed already: ``app.application_env``) and the facts.
    Under DTLS, ``SSL_DTLS_MAX_DATAGRAM`` tells it the largest datagram it
    may send.  Raises ``SystemFailure`` if it cannot be spawned, after
    closing what was opened for it (not the link).
    """
    facts = connection_facts(link.conn)
    if link.max_datagram is not None:
        facts["SSL_DTLS_MAX_DATAGRAM"] = str(link.max_datagram)
    ours, theirs = _application_channel(link.max_datagram is not None)
    try:
        pid = spawn(prog, {**env, **facts}, {theirs[0]: app_fds[0], theirs[1]: app_fds[1]})
    except OSError as exc:
        for fd in {*ours, *theirs}:
            os.close(fd)
        raise SystemFailure(f"unable to spawn {prog[0]}: {exc.strerror}") from None
    for fd in theirs:
        os.close(fd)
    return Application(pid, ours, facts)


def ended(cfg: TlsConfig, link: Link, app: Application, stats: Stats, status: int, log: Log) -> int:
    """The end of a tunnel whose application exited with wait ``status``: its exit code.

    A client keeps its session (TLS_SESSION_DIR); the application's
    datagrams that were too large are reported in one warning; the -v 2
    line sums the tunnel up.
    """
    keep_session(link.conn, log.warn)
    code = exit_code(status)
    refused = f" refused {stats.refused}" if link.max_datagram is not None else ""
    if stats.refused:
        log.warn(
            f"refused {stats.refused} datagram(s) of prog larger than"
            f" SSL_DTLS_MAX_DATAGRAM {link.max_datagram} (DTLS_MTU {cfg.dtls_mtu})"
        )
    log.info(summary(app.facts, stats, refused=refused, status=f" status {code}"))
    return code


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
    on_handshake: Callable[[], None] | None = None,
    hello: bytes | None = None,
) -> int:
    """Run one TLS connection on ``rfd``/``wfd`` for ``prog``; return the exit code.

    The handshake comes first, with every check of the peer; only then is
    ``prog`` spawned, with the cleartext pipes on ``app_fds`` (read, write)
    and the TLS facts in its environment.  The engine then pumps until the
    end, and the exit code is prog's (128 + signal if it was killed).
    ``on_handshake``, if given, is called once the handshake and the checks
    of the peer succeeded, before prog is spawned.  ``log`` is the
    connection's (``Log.about``): its lines name the peer.  SIGTERM, SIGINT,
    SIGHUP and SIGQUIT received once prog runs are passed on to it, and the
    exit code is still prog's.

    Under DTLS, ``SSL_DTLS_MAX_DATAGRAM`` tells prog the largest datagram
    it may send; a larger one is refused, counted and reported in one
    warning at the end.  ``hello``: see ``establish``.

    Takes ownership of ``rfd`` and ``wfd`` (closed before it returns).
    Raises ``HandshakeError`` (97), ``HandshakeTimeout``/``TlsRuntimeError``
    (98), ``SystemFailure`` (111); a ``TlsRuntimeError`` only once prog is gone.
    """
    for fd in {rfd, wfd}:
        os.set_inheritable(fd, False)  # the application never sees the network
    link = establish(cfg, ctx, rfd, wfd, hello)
    if on_handshake is not None:
        on_handshake()
    env = application_env(environ, keep_secrets=cfg.options.keep_env, extra=extra_env)
    with SelfPipe(PASSED_SIGNALS) as selfpipe:
        try:
            app = start_application(cfg, link, prog, env, app_fds)
        except SystemFailure:
            link.close()
            raise
        status, stats = pump(cfg, link, (*app.ours, selfpipe.fileno()), app.pid)
    assert status is not None
    return ended(cfg, link, app, stats, status, log)


def pump(
    cfg: TlsConfig, link: Link, fds: tuple[int, int, int], pid: int | None
) -> tuple[int | None, Stats]:
    """``engine.run`` with ``cfg``'s options: -s/-S, -j/-J, the idle timeout, kernel TLS.

    ``fds``: (read from the application, write to it, selfpipe).  Returns
    ``run``'s status and the tunnel's ``Stats``; raises what ``run`` raises.
    """
    stats = Stats()
    status = run(link, fds, pid, stats=stats, ktls=cfg.options.ktls, **closing(cfg))
    return status, stats


def closing(cfg: TlsConfig) -> dict[str, Any]:
    """How ``cfg`` says a tunnel ends, as ``engine.run`` and ``engine.machine_for`` take it."""
    opts = cfg.options
    return {
        "close_notify": opts.close_notify,
        "strict_close_notify": opts.strict_close_notify,
        "idle_timeout": opts.idle_timeout,
    }


def summary(facts: Mapping[str, str], stats: Stats, *, refused: str = "", status: str = "") -> str:
    """The -v 2 line of a tunnel that ended: its facts, bytes, ending and data path."""
    sni = facts.get("SSL_TLS_SNI_SERVERNAME", "-")
    return (
        f"sni {sni} {facts['SSL_PROTOCOL']} {facts['SSL_CIPHER']}"
        f" in {stats.to_app} out {stats.to_peer}{refused} closed by {stats.ending}{status}"
        f" path {stats.path}"
    )


def _application_channel(datagram: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """((our read, our write), (prog's read, prog's write)) descriptors.

    Two pipes for a stream; for datagrams, one ``SOCK_SEQPACKET`` socketpair,
    whose ends are the same descriptor both ways (prog's twice, duplicated).
    """
    if not datagram:
        to_app_r, to_app_w = os.pipe()
        from_app_r, from_app_w = os.pipe()
        return (from_app_r, to_app_w), (to_app_r, from_app_w)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    app = theirs.detach()
    return (ours.detach(),) * 2, (app, os.dup(app))

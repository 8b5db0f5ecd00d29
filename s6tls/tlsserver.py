"""s6-tlsserver: TCP listener plus s6-tlsd, as one fork-server.

Everything is imported and every TLS context built once, before the first
accept; each connection is then served by a forked child of this already
initialised process (no new interpreter), which runs the s6-tlsd logic
(``tunnel.serve_connection``) and exits with prog's status.  See
man/s6-tlsserver.1.

Signals reach the accept loop through a selfpipe: SIGCHLD reaps children,
SIGTERM stops accepting and lets running connections finish, SIGQUIT also
sends them SIGTERM, SIGHUP rebuilds the contexts from the files named in the
environment (new connections only).
"""

import gc
import json
import os
import select
import signal
import socket
import sys
from collections import Counter
from collections.abc import Sequence

import click
from OpenSSL import SSL

from .app import exit_code
from .cli import CONTEXT_SETTINGS, Log, run_main, tls_options, verbosity_flags
from .config import Options, TlsConfig, is_ip
from .context import build_context
from .errors import ExitCode, S6tlsError, SystemFailure, UsageError
from .pump import Pump
from .selfpipe import SelfPipe
from .tunnel import drop_privileges, serve_connection

PROG = "s6-tlsserver"
log = Log(PROG)


@click.command(context_settings=CONTEXT_SETTINGS)
@verbosity_flags
@click.option("-4", "family", flag_value=4, help="The address must be IPv4.")
@click.option("-6", "family", flag_value=6, help="The address must be IPv6 (no IPv4 on ::).")
@click.option("-1", "notify", is_flag=True, help="Write a newline to stdout once listening.")
@click.option("-c", "maxconn", type=click.IntRange(min=1), default=40, metavar="MAXCONN")
@click.option("-C", "localmaxconn", type=click.IntRange(min=1), default=40, metavar="LOCALMAX")
@click.option("-b", "backlog", type=click.IntRange(min=1), default=128, metavar="BACKLOG")
@click.option("-u", "uid", type=click.IntRange(min=0), default=None, metavar="UID")
@click.option("-g", "gid", type=click.IntRange(min=0), default=None, metavar="GID")
@click.option("-U", "env_ids", is_flag=True, help="Take -u and -g from $UID and $GID.")
@tls_options
@click.option("-Y", "peer_verify", flag_value="optional", help="Ask for a client certificate.")
@click.option("-y", "peer_verify", flag_value="required", help="Require a client certificate.")
@click.option("-k", "sni_level", type=int, default=0, metavar="SNILEVEL", help="SNI level.")
@click.argument("ip")
@click.argument("port", type=click.IntRange(0, 65535))
@click.argument("prog", nargs=-1, required=True)
def command(
    ip: str,
    port: int,
    prog: tuple[str, ...],
    family: int | None,
    notify: bool,
    maxconn: int,
    localmaxconn: int,
    backlog: int,
    uid: int | None,
    gid: int | None,
    env_ids: bool,
    verbosity: int | None,
    **opts: object,
) -> int:
    """s6-tlsserver [options] ip port prog...: serve TLS on ip:port, prog per connection."""
    verbosity = 1 if verbosity is None else verbosity
    log.verbosity = verbosity
    opts["peer_verify"] = opts["peer_verify"] or "none"
    options = Options(verbosity=verbosity, **opts)  # type: ignore[arg-type]
    cfg = TlsConfig.from_env("server", os.environ, options)
    if env_ids:
        uid, gid = _env_id("UID"), _env_id("GID")
    ctx = build_context(cfg)
    listener = listen(ip, port, family, backlog)
    server = Server(cfg, ctx, listener, prog, min(localmaxconn, maxconn), maxconn, (uid, gid))
    return server.serve(notify)


class Server:
    """The accept loop, the spare child, and the bookkeeping of live children.

    One child serves one connection.  To keep fork() and the page faults that
    follow it off the connection's critical path, the server keeps one
    *spare*: a child forked ahead of time, waiting on a Unix socket.  On
    accept, the server hands the connection's descriptor and its TCP
    variables to the spare (SCM_RIGHTS), which serves it, and forks the next
    spare.
    """

    def __init__(
        self,
        cfg: TlsConfig,
        ctx: SSL.Context,
        listener: socket.socket,
        prog: Sequence[str],
        localmaxconn: int,
        maxconn: int,
        app_ids: tuple[int | None, int | None],
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.listener: socket.socket | None = listener
        self.prog = prog
        self.localmaxconn = localmaxconn
        self.maxconn = maxconn
        self.app_ids = app_ids
        self.children: dict[int, str] = {}  # pid -> remote ip
        self.per_ip: Counter[str] = Counter()
        self.spare: tuple[int, socket.socket] | None = None  # pid, our end of its channel

    def serve(self, notify: bool) -> int:
        """Accept until SIGTERM, then wait for the running connections; return 0.

        ``notify`` (-1): write the readiness newline, once the signal handlers
        are in place, so that a SIGHUP sent at readiness is a reload.
        """
        with SelfPipe(
            (signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGINT)
        ) as selfpipe:
            self.selfpipe = selfpipe
            if notify:
                _notify_ready()
            _detach_stdio()
            poller = select.poll()
            poller.register(selfpipe.fileno(), select.POLLIN)
            assert self.listener is not None
            poller.register(self.listener.fileno(), select.POLLIN)
            gc.freeze()  # keep the pages shared with the children shared
            self._fork_spare()
            while self.listener is not None or self.children:
                for fd, _events in poller.poll():
                    if fd == selfpipe.fileno():
                        self._on_signals(selfpipe.read(), poller)
                    elif self.listener is not None and fd == self.listener.fileno():
                        self._accept()
        return ExitCode.OK

    def _on_signals(self, signals: list[int], poller: select.poll) -> None:
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                if self.listener is not None:
                    poller.unregister(self.listener.fileno())
                    self.listener.close()
                    self.listener = None
                    self._retire_spare()
                    log.info(f"stopped accepting, {len(self.children)} connections running")
                if sig == signal.SIGQUIT:
                    for pid in self.children:
                        os.kill(pid, signal.SIGTERM)
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare[0]:
                self.spare[1].close()  # it died before serving: the next accept forks anew
                self.spare = None
            ip = self.children.pop(pid, None)
            if ip is None:
                continue
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            code = exit_code(status)
            log.info(f"end pid {pid} status {code} count {len(self.children)}/{self.maxconn}")

    def _reload(self) -> None:
        try:
            self.ctx = build_context(self.cfg)
        except S6tlsError as exc:
            log.warn(f"unable to reload the keypairs, keeping the old ones: {exc}")
            return
        log.info("reloaded the keypairs")
        if self.listener is not None:
            self._retire_spare()  # it holds the old contexts
            self._fork_spare()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        with conn:
            ip = _unmap(addr[0])
            if len(self.children) >= self.maxconn or self.per_ip[ip] >= self.localmaxconn:
                log.warn(f"refused {ip} port {addr[1]}: too many connections")
                return
            local = conn.getsockname()
            env = {
                "PROTO": "TCP",
                "TCPLOCALIP": _unmap(local[0]),
                "TCPLOCALPORT": str(local[1]),
                "TCPREMOTEIP": ip,
                "TCPREMOTEPORT": str(addr[1]),
                "TCPCONNNUM": str(self.per_ip[ip]),
            }
            pid = self._hand_over(conn, env)
        self.children[pid] = ip
        self.per_ip[ip] += 1
        log.info(f"allow {ip} port {addr[1]} pid {pid} count {len(self.children)}/{self.maxconn}")
        self._fork_spare()

    def _hand_over(self, conn: socket.socket, env: dict[str, str]) -> int:
        """Give ``conn`` and its TCP variables to the spare; return the spare's pid."""
        message = json.dumps(env).encode()
        for _attempt in range(2):
            if self.spare is None:
                self._fork_spare()
            assert self.spare is not None
            pid, channel = self.spare
            self.spare = None
            try:
                socket.send_fds(channel, [message], [conn.fileno()])
            except OSError:
                continue  # the spare died: fork another one
            finally:
                channel.close()
            return pid
        raise SystemFailure("unable to hand a connection to a child")

    def _fork_spare(self) -> None:
        if self.spare is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._spare_main(theirs)  # never returns
        theirs.close()
        self.spare = (pid, ours)

    def _retire_spare(self) -> None:
        """Close the spare's channel: it exits without serving anything."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None

    def _spare_main(self, channel: socket.socket) -> None:
        """The spare child: warm up, wait for a connection, serve it, os._exit."""
        code = ExitCode.SYSTEM
        try:
            self.selfpipe.__exit__(None, None, None)  # the child's own signals are its own
            if self.listener is not None:
                self.listener.close()
            warm_up(self.ctx)
            message, fds, _flags, _addr = socket.recv_fds(channel, 4096, 1)
            channel.close()
            if not fds:
                code = ExitCode.OK  # retired before it got a connection
                return
            env = json.loads(message)
            _set_ids(*self.app_ids)
            drop_privileges(self.cfg)
            peer = f"{env['TCPREMOTEIP']}:{env['TCPREMOTEPORT']}"
            code = serve_connection(
                self.cfg,
                self.ctx,
                fds[0],
                fds[0],
                self.prog,
                log,
                app_fds=(0, 1),
                environ=os.environ,
                extra_env=env,
                peer=peer,
            )
        except S6tlsError as exc:
            log.fatal(str(exc))
            code = exc.exit_code
        except OSError as exc:
            log.fatal(f"{exc.strerror or exc}")
        except BaseException as exc:  # a bug of ours: one line, and the child still exits
            log.fatal(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            os._exit(code)


def warm_up(ctx: SSL.Context) -> None:
    """Touch, ahead of the connection, the memory a connection first writes to.

    A freshly forked child shares its pages with the server until it writes
    to them.  Building (and dropping) a TLS object and the engine's buffers
    here takes some of those page faults off the connection's path.  A full
    in-memory handshake would warm more but costs more CPU than it saves
    under load (measured: 1.5x stunnel's rate with 4 clients became 1.25x).
    """
    SSL.Connection(ctx, None).set_accept_state()
    Pump()


def listen(ip: str, port: int, family: int | None, backlog: int) -> socket.socket:
    """A listening TCP socket on ``ip``:``port``; ``family`` 4 or 6 checks the address.

    Raises ``UsageError`` for an address that is not an IP literal of the
    right family, ``SystemFailure`` if the bind fails.
    """
    if not is_ip(ip):
        raise UsageError(f"{ip} is not an IP address")
    v6 = ":" in ip
    if family is not None and (family == 6) != v6:
        raise UsageError(f"{ip} is not an IPv{family} address")
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(family == 6))
    try:
        sock.bind((ip, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SystemFailure(f"unable to bind {ip} port {port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _unmap(ip: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) in its IPv4 form."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _env_id(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise UsageError(f"-U needs a numeric {name} in the environment")
    return int(value)


def _set_ids(uid: int | None, gid: int | None) -> None:
    """Become gid then uid (-g/-u/-U): the whole connection runs as them."""
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def _notify_ready() -> None:
    """-1: one newline on stdout, the readiness notification of s6-supervise."""
    try:
        os.write(1, b"\n")
    except OSError as exc:
        log.warn(f"unable to notify readiness: {exc.strerror}")


def _detach_stdio() -> None:
    """Close stdin and stdout as s6-tcpserver does, keeping the numbers on /dev/null."""
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PROG, command, argv, log)

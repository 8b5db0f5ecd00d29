"""s6-tlsserver: TCP listener plus s6-tlsd, as one fork-server.

Everything is imported and every TLS context built once, before the first
accept; each connection is then served by a forked child of this already
initialised process (no new interpreter), which runs the s6-tlsd logic
(``Setup.serve_connection``) and exits with prog's status.  See
man/s6-tlsserver.1.

Signals reach the accept loop through a selfpipe: SIGCHLD reaps children,
SIGTERM stops accepting, drops the connections still in their handshake and
lets running ones finish, SIGQUIT also sends SIGTERM to the running ones,
SIGHUP rebuilds the contexts from the files named in the environment (new
connections only).  Every child inherits the context, and with it the
session ticket key, so children resume each other's sessions; the key is
replaced on SIGHUP and at least every 12 hours.  Under systemd, the
listening sockets may come from a socket unit and readiness goes to
``NOTIFY_SOCKET``.
"""

import contextlib
import dataclasses
import errno
import gc
import json
import os
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from OpenSSL import SSL

from . import gate, options, systemd
from .access import Denied
from .app import exit_code
from .cli import Log, peer_address, plural
from .config import is_ip
from .errors import ExitCode, S6tlsError, SystemFailure, UsageError
from .lifetime import Lifetime
from .options import Operand, Opt
from .program import Program, Setup
from .program import main as run
from .rules import apply_env
from .selfpipe import SelfPipe
from .tlsd import ENVIRONMENT as TLSD_ENVIRONMENT
from .ucspi import unmap

FAMILY = (
    Opt("family", ("-4",), "ip must be an IPv4 address", value=4, default=None),
    Opt("family", ("-6",), "ip must be an IPv6 address; on :: no IPv4", value=6),
)
SERVER = (
    Opt(
        "notify",
        ("-1", "--notify"),
        "once listening, write the port and a newline",
        default=False,
    ),
    Opt(
        "maxconn",
        ("-c", "--global-max-connections"),
        "at most MAXCONN connections at once",
        arg="MAXCONN",
        parse=options.positive,
        default=40,
    ),
    Opt(
        "localmaxconn",
        ("-C", "--local-max-connections"),
        "at most LOCALMAXCONN per client address",
        arg="LOCALMAXCONN",
        parse=options.positive,
        default=40,
    ),
    Opt(
        "backlog",
        ("-b", "--backlog"),
        "the listen backlog",
        arg="BACKLOG",
        parse=options.positive,
        default=128,
    ),
    Opt(
        "uid",
        ("-u", "--uid"),
        "serve each connection as UID (needs -g)",
        arg="UID",
        parse=options.unsigned,
        default=None,
    ),
    Opt(
        "gid",
        ("-g", "--gid"),
        "serve each connection as GID, no other group",
        arg="GID",
        parse=options.unsigned,
        default=None,
    ),
    Opt(
        "env_ids",
        ("-U", "--envuidgid"),
        "the ids of UID, GID, GIDLIST (s6-envuidgid)",
        default=False,
    ),
    Opt(
        "groups",
        ("-G", "--gidlist"),
        "with -g, the supplementary groups (comma-separated gids)",
        arg="GIDLIST",
        parse=options.gid_list,
        default=(),
    ),
)
ENVIRONMENT = (
    *TLSD_ENVIRONMENT[:-1],
    ("UID, GID, GIDLIST", "with -U"),
    ("LISTEN_FDS, LISTEN_PID", "systemd's listening sockets: nothing is bound"),
    ("NOTIFY_SOCKET", "systemd's readiness socket (Type=notify)"),
)
EXIT_CODES = (
    ("0", "stopped by SIGTERM, SIGINT or SIGQUIT, once the connections ended"),
    ("96", "a certificate, key or CA file that cannot be used"),
    ("100", "usage: a bad option, operand or environment variable"),
    ("111", "a system call failed, such as the bind"),
    ("126, 127", "prog cannot be executed, or is not found"),
    ("", "a connection's child exits as s6-tlsd does; -v logs it"),
)
PAUSE = 0.1  # seconds without accept() after EMFILE and the like
_PAUSING_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
HANDSHAKE_DONE = b"h"  # a child's report to the server, on its channel


def serve(setup: Setup) -> int:
    """Listen (or take systemd's sockets), then accept until told to stop."""
    v = setup.values
    listeners = systemd.listening_sockets(os.environ)
    before_tls = gate.Gate.from_values(v)
    if v["ident"]:
        setup.log.warn("-r: s6tls does no IDENT look-up, TCPREMOTEINFO stays unset")
    server = Server(setup, listeners, before_tls)
    if not listeners:
        server.listeners = [listen(v["ip"], v["port"], v["family"], v["backlog"])]
        server.bound = True
    return server.serve(v["notify"])


@dataclass
class Child:
    """A child serving one connection, as the accept loop knows it."""

    peer: str
    ip: str
    channel: socket.socket | None  # open until the child reports its handshake done
    dropped: bool = False  # sent SIGTERM in its handshake, at shutdown


class Server:
    """The accept loop, the spare child, and the bookkeeping of live children.

    One child serves one connection.  To keep fork() and the page faults that
    follow it off the connection's critical path, the server keeps one
    *spare*: a child forked ahead of time, waiting on a Unix socket, its
    *channel*.  On accept, the server hands the connection's descriptor and
    its TCP variables to the spare (SCM_RIGHTS), which serves it, and forks
    the next spare.  The child writes on its channel when its handshake is
    done: until then, SIGTERM to the server drops it at once.
    """

    def __init__(self, setup: Setup, listeners: list[socket.socket], before_tls: gate.Gate) -> None:
        self.setup = setup
        self.gate = before_tls
        self.log = setup.log
        self.listeners = listeners
        self.bound = False  # True: we bound the listeners; False: systemd's, shared with it
        self.maxconn: int = setup.values["maxconn"]
        self.localmaxconn = min(setup.values["localmaxconn"], self.maxconn)
        self.children: dict[int, Child] = {}
        self.per_ip: Counter[str] = Counter()
        self.spare: tuple[int, socket.socket] | None = None  # pid, our end of its channel
        self.poller = select.poll()
        self.paused_until: float | None = None
        self.trouble: tuple[str, int | None] | None = None  # logged once, until an accept works

    def serve(self, notify: bool) -> int:
        """Accept until SIGTERM, then wait for the running connections; return 0.

        ``notify`` (-1): write the port and a newline on stdout; and tell
        systemd when NOTIFY_SOCKET is set.  Both once the signal handlers
        are in place, so that a SIGHUP sent at readiness is a reload.
        """
        signals = (signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGINT)
        with SelfPipe(signals) as selfpipe:
            self.selfpipe = selfpipe
            self._ready(notify)
            self.poller.register(selfpipe.fileno(), select.POLLIN)
            self._watch_listeners(True)
            gc.freeze()  # keep the pages shared with the children shared
            self._fork_spare()
            while self.listeners or self.children:
                for fd, _events in self.poller.poll(self._timeout_ms()):
                    if fd == selfpipe.fileno():
                        self._on_signals(selfpipe.read())
                    else:
                        self._accept(fd)
                self._resume_if_due()
                self._rotate_if_due()
        return ExitCode.OK

    def _ready(self, notify: bool) -> None:
        """Tell whoever waits that the server listens, then detach stdin and stdout."""
        null = os.open(os.devnull, os.O_RDWR)  # before readiness: no failure after it
        local = self.listeners[0].getsockname()
        self.log.info(f"listening on {peer_address(unmap(local[0]), local[1])}")
        if notify:
            try:
                os.write(1, f"{local[1]}\n".encode())
            except OSError as exc:
                self.log.warn(f"unable to notify readiness: {exc.strerror}")
        problem = systemd.notify(os.environ, "READY=1")
        if problem:
            self.log.warn(problem)
        # Close stdin and stdout as s6-tcpserver does, keeping the numbers on /dev/null.
        for fd in (0, 1):
            os.dup2(null, fd)
        os.close(null)

    def _watch_listeners(self, watch: bool) -> None:
        for listener in self.listeners:
            if watch:
                self.poller.register(listener.fileno(), select.POLLIN)
            else:
                self.poller.unregister(listener.fileno())

    def _on_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._stop()
                if sig == signal.SIGQUIT:
                    for pid in self.children:
                        os.kill(pid, signal.SIGTERM)
        self._reap()

    def _stop(self) -> None:
        """Stop accepting; drop the connections still in their handshake."""
        if not self.listeners:
            return
        if self.paused_until is None:
            self._watch_listeners(False)
        self.paused_until = None
        for listener in self.listeners:
            # shutdown() stops the listening for every process that holds the
            # socket (a spare just forked may not have closed its copy yet);
            # never on systemd's, which must go on listening for the next start.
            if self.bound:
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.listeners = []
        self._retire_spare()
        dropped = 0
        for pid, child in self.children.items():
            if _in_handshake(child):
                child.dropped = True
                dropped += 1
                os.kill(pid, signal.SIGTERM)
        running = len(self.children) - dropped
        self.log.info(
            f"stopped accepting, {plural(running, 'connection')} running,"
            f" {plural(dropped, 'handshake')} dropped"
        )

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
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.channel is not None:
                child.channel.close()
            self.per_ip[child.ip] -= 1
            if not self.per_ip[child.ip]:
                del self.per_ip[child.ip]
            code = exit_code(status)
            if child.dropped:
                self.log.info(f"peer {child.peer} pid {pid}: dropped in the handshake")
            self.log.info(f"end pid {pid} status {code} count {len(self.children)}/{self.maxconn}")

    def _reload(self) -> None:
        try:
            self.setup.contexts.reload()
        except S6tlsError as exc:
            self.log.warn(f"unable to reload the keypairs, keeping the old ones: {exc}")
            return
        self.setup = dataclasses.replace(self.setup, ctx=self.setup.contexts.context)
        self.log.info("reloaded the keypairs")
        if self.listeners:
            self._retire_spare()  # it holds the old contexts
            self._fork_spare()

    def _accept(self, fd: int) -> None:
        listener = next((s for s in self.listeners if s.fileno() == fd), None)
        if listener is None:
            return
        if self.spare is None:
            self._fork_spare()
            if self.spare is None:
                return  # paused: the connection waits in the backlog
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            self._trouble("unable to accept", exc, exc.errno in _PAUSING_ERRORS)
            return
        self.trouble = None
        with conn:
            ip = unmap(addr[0])
            peer = peer_address(ip, addr[1])
            if len(self.children) >= self.maxconn:
                self.log.warn(f"peer {peer}: refused: too many connections (-c {self.maxconn})")
                return
            if self.per_ip[ip] >= self.localmaxconn:
                limit = f"-C {self.localmaxconn}"
                self.log.warn(f"peer {peer}: refused: too many connections from {ip} ({limit})")
                return
            local = conn.getsockname()
            env = {
                "PROTO": "TCP",
                "TCPLOCALIP": unmap(local[0]),
                "TCPLOCALPORT": str(local[1]),
                "TCPREMOTEIP": ip,
                "TCPREMOTEPORT": str(addr[1]),
                "TCPCONNNUM": str(self.per_ip[ip]),
            }
            handed = self._hand_over(conn, env)
        if handed is None:
            self.log.warn(f"peer {peer}: refused: unable to start a child")
            return
        pid, channel = handed
        self.children[pid] = Child(peer, ip, channel)
        self.per_ip[ip] += 1
        count = f"{len(self.children)}/{self.maxconn}"
        self.log.info(f"allow {ip} port {addr[1]} pid {pid} count {count}")
        self._fork_spare()

    def _trouble(self, what: str, exc: OSError, pause: bool) -> None:
        """A warning for an error of the accept loop, once until an accept works.

        With ``pause`` (out of descriptors, memory or processes), stop
        watching the listeners for ``PAUSE`` seconds: new connections wait
        in the backlog instead of being accepted and dropped.
        """
        if (what, exc.errno) != self.trouble:
            self.trouble = (what, exc.errno)
            then = f", pausing accepts for {PAUSE * 1000:.0f} ms" if pause else ""
            self.log.warn(f"{what}: {exc.strerror}{then}")
        if pause and self.paused_until is None and self.listeners:
            self._watch_listeners(False)
            self.paused_until = time.monotonic() + PAUSE

    def _timeout_ms(self) -> int:
        """Until the accept pause ends or the session ticket key must be replaced."""
        left = self.setup.contexts.seconds_to_rotation()
        if self.paused_until is not None:
            left = min(left, self.paused_until - time.monotonic())
        return max(0, int(left * 1000) + 1)

    def _rotate_if_due(self) -> None:
        """A new session ticket key every 12 hours: new children get a new context."""
        if self.setup.contexts.rotate_if_due():
            self.setup = dataclasses.replace(self.setup, ctx=self.setup.contexts.context)
            if self.listeners:
                self._retire_spare()  # it holds the old key
                self._fork_spare()

    def _resume_if_due(self) -> None:
        if self.paused_until is not None and time.monotonic() >= self.paused_until:
            self.paused_until = None
            self._watch_listeners(True)

    def _hand_over(
        self, conn: socket.socket, env: dict[str, str]
    ) -> tuple[int, socket.socket] | None:
        """Give ``conn`` and its TCP variables to the spare: its pid and channel, or None."""
        message = json.dumps(env).encode()
        for _attempt in range(2):
            if self.spare is None:
                self._fork_spare()
            if self.spare is None:
                return None
            pid, channel = self.spare
            self.spare = None
            try:
                socket.send_fds(channel, [message], [conn.fileno()])
            except OSError:
                channel.close()
                continue  # the spare died: fork another one
            return pid, channel
        return None

    def _fork_spare(self) -> None:
        if self.spare is not None or not self.listeners:
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._trouble("unable to prepare a child", exc, True)
            return
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            self._trouble("unable to fork", exc, True)
            return
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

    def _spare_main(self, channel: socket.socket) -> NoReturn:
        """The spare child: warm up, wait for a connection, serve it, os._exit."""
        code = ExitCode.SYSTEM
        log = self.log
        try:
            self.selfpipe.__exit__(None, None, None)  # the child's own signals are its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # in the handshake: die at once
            for listener in self.listeners:
                listener.close()
            warm_up(self.setup.ctx)
            message, fds, _flags, _addr = socket.recv_fds(channel, 4096, 1)
            if not fds:
                code = ExitCode.OK  # retired before it got a connection
                return _exit(code)
            env = json.loads(message)
            log = self._log_for(env)
            try:
                setup = self._admit(fds[0], env)
            finally:
                log = self._log_for(env)  # the client a PROXY header named, if any
            peer = peer_address(env["TCPREMOTEIP"], env["TCPREMOTEPORT"])
            setup.drop_privileges()
            code = setup.serve_connection(
                fds[0],
                fds[0],
                app_fds=(0, 1),
                peer=peer,
                on_handshake=lambda: _report_handshake(channel),
            )
        except Denied as exc:
            log.info(str(exc))
            code = exc.exit_code
        except S6tlsError as exc:
            log.warn(str(exc))
            log.traceback()
            code = exc.exit_code
        except OSError as exc:
            log.warn(exc.strerror or str(exc))
            log.traceback()
        except BaseException as exc:  # a bug of ours: one line, and the child still exits
            log.warn(f"internal error: {type(exc).__name__}: {exc}")
            log.traceback()
        return _exit(code)

    def _log_for(self, env: dict[str, str]) -> Log:
        """The logger of the connection whose TCP variables are ``env``."""
        return self.log.about(peer_address(env["TCPREMOTEIP"], env["TCPREMOTEPORT"]), os.getpid())

    def _admit(self, fd: int, env: dict[str, str]) -> Setup:
        """Before TLS, in the child: banner, PROXY header, rules (``gate``).

        Updates ``env`` from a PROXY header; puts the connection's variables
        and the rule's changes in this child's own environment, prog's to
        be; returns the setup to serve with (another prog for an exec rule).
        Raises what ``Gate.receive`` and ``Gate.check`` raise.
        """
        sock = socket.socket(fileno=fd)
        try:
            self.gate.receive(sock, env, self.setup.cfg.options.handshake_timeout_ms)
            admission = self.gate.check(env, self._log_for(env).warn)
        finally:
            sock.detach()
        os.environ.update(env)
        apply_env(os.environ, admission.env)
        if admission.exec is None:
            return self.setup
        return dataclasses.replace(self.setup, app=("execlineb", "-c", admission.exec))


def _exit(code: int) -> NoReturn:
    """A forked child always leaves this way: no atexit, no flush of the parent's buffers."""
    os._exit(code)


def _report_handshake(channel: socket.socket) -> None:
    """In the child: tell the server that the handshake is done (SIGTERM now spares us)."""
    with contextlib.suppress(OSError):  # the server is gone: nothing to tell
        channel.send(HANDSHAKE_DONE)
    channel.close()


def _in_handshake(child: Child) -> bool:
    """True if ``child`` has not reported the end of its handshake (nor ended)."""
    if child.channel is None:
        return False
    try:
        report = child.channel.recv(16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        report = b""
    child.channel.close()
    child.channel = None
    return report not in (HANDSHAKE_DONE, b"")


def warm_up(ctx: SSL.Context) -> None:
    """Touch, ahead of the connection, the memory a connection first writes to.

    A freshly forked child shares its pages with the server until it writes
    to them.  Building (and dropping) a TLS object and the engine's buffers
    here takes some of those page faults off the connection's path.  A full
    in-memory handshake would warm more but costs more CPU than it saves
    under load (measured: 1.5x stunnel's rate with 4 clients became 1.25x).
    """
    SSL.Connection(ctx, None).set_accept_state()
    Lifetime()


def listen(ip: str, port: int, family: int | None, backlog: int) -> socket.socket:
    """A listening TCP socket on ``ip``:``port``; ``family`` 4 or 6 checks the address.

    Raises ``UsageError`` for an address of the wrong family,
    ``SystemFailure`` if the bind fails.
    """
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


def ip_address(text: str, name: str) -> str:
    """The ``ip`` operand: an IPv4 or IPv6 literal."""
    if not is_ip(text):
        raise UsageError(f"{text} is not an IP address")
    return text


PROGRAM = Program(
    name="s6-tlsserver",
    role="server",
    summary="Listen on ip port and serve each connection over TLS to a new prog.",
    options=(
        *options.VERBOSITY_SWITCHES,
        *FAMILY,
        *SERVER,
        *options.CLOSE,
        *options.KEEP,
        options.HANDSHAKE_TIMEOUT.with_default(10000),
        options.IDLE_TIMEOUT,
        *options.KTLS,
        *options.SERVER_TLS,
        *gate.OPTIONS,
    ),
    operands=(Operand("ip", ip_address), Operand("port", options.port_number)),
    serve=serve,
    environment=ENVIRONMENT,
    exit_codes=EXIT_CODES,
    issues_tickets=True,
)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(PROGRAM, argv)

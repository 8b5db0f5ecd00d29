"""What s6-tlsserver and s6-dtlsserver share: one process that forks a child per peer.

Everything is imported and every TLS context built once, before the first
peer; each peer is then served by a forked child of this already
initialised process (no new interpreter).  ``ForkServer`` is the loop and
the bookkeeping both servers share; a server adds what is its own: what to
do when a listening socket is readable (``on_listener``: accept a TCP
connection, or read datagrams and check their cookie) and what a child does
with the descriptor and the variables it is handed (``serve_child``).

Signals reach the loop through a selfpipe: SIGCHLD reaps children, SIGTERM
(and SIGINT) stops listening, drops the children still in their handshake
and lets running ones finish, SIGQUIT also sends SIGTERM to the running
ones, SIGHUP rebuilds the contexts from the files named in the environment
(new peers only).  Every child inherits the context, and with it the
session ticket key, so children resume each other's sessions; the key is
replaced on SIGHUP and at least every 12 hours.  Readiness (-1) is the
port written on stdout, and ``READY=1`` to systemd's ``NOTIFY_SOCKET``.
"""

import contextlib
import errno
import gc
import os
import select
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from ..cli import Log, failure, plural
from ..deadline import earliest, wait_ms
from ..errors import ExitCode, S6tlsError
from ..net import systemd
from ..net.access import Denied
from ..net.ucspi import peer_address, peer_of, unmap
from ..selfpipe import SelfPipe
from . import spare
from .app import exit_code
from .connection import Setup

if TYPE_CHECKING:
    pass

PAUSE = 0.1  # seconds without taking new peers after EMFILE and the like
PAUSING_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


@dataclass
class Child:
    """A child serving one peer, as the server knows it."""

    peer: str
    ip: str
    channel: socket.socket | None  # open until the child reports its handshake done
    dropped: bool = False  # sent SIGTERM in its handshake, at shutdown


class ForkServer:
    """The loop, the spare child, and the bookkeeping of live children.

    One child serves one peer.  To keep fork() and the page faults that
    follow it off the peer's critical path, the server keeps one *spare*: a
    child forked ahead of time, waiting on a Unix socket, its *channel*.  A
    server hands a peer's descriptor and its variables to the spare
    (``start_child``, SCM_RIGHTS), which serves it, and forks the next
    spare.  The child writes on its channel when its handshake is done:
    until then, SIGTERM to the server drops it at once.

    A subclass implements ``on_listener`` and ``serve_child``.
    """

    def __init__(self, setup: Setup, listeners: list[socket.socket], bound: bool) -> None:
        self.setup = setup
        self.log = setup.log
        self.listeners = listeners
        self.bound = bound  # True: we bound the listeners; False: systemd's, shared with it
        self.maxconn = setup.settings.maxconn
        self.localmaxconn = min(setup.settings.localmaxconn, self.maxconn)
        self.children: dict[int, Child] = {}
        self.serving: set[str] = set()  # the children's peers, IP:PORT
        self.per_ip: Counter[str] = Counter()
        self.spare: tuple[int, socket.socket] | None = None  # pid, our end of its channel
        self.poller = select.poll()
        self.paused_until: float | None = None
        self.trouble: tuple[str, int | None] | None = None  # logged once, until an accept works

    # -- what a server adds ------------------------------------------------

    def on_listener(self, listener: socket.socket) -> None:
        """The listening socket ``listener`` is readable: take what came."""
        raise NotImplementedError

    def serve_child(self, env: dict[str, str], fd: int, channel: socket.socket) -> int:
        """In the child: serve the peer on ``fd`` with the variables ``env``; the exit code.

        Call ``spare.report_handshake(channel)`` once the handshake is done.  May
        raise; ``env`` may be updated in place (its peer names the log lines).
        """
        raise NotImplementedError

    # -- the loop ----------------------------------------------------------

    def serve(self, notify: bool) -> int:
        """Take peers until SIGTERM, then wait for the running children; return 0.

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
                        listener = next((s for s in self.listeners if s.fileno() == fd), None)
                        if listener is not None:
                            self.on_listener(listener)
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
        problem = systemd.notify(self.setup.environ, "READY=1")
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
        """Stop listening; drop the children still in their handshake."""
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
                with contextlib.suppress(OSError):  # ENOTCONN: a UDP socket
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
                self.spare[1].close()  # it died before serving: the next peer forks anew
                self.spare = None
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.channel is not None:
                child.channel.close()
            self.serving.discard(child.peer)
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
        self.log.info("reloaded the keypairs")
        if self.listeners:
            self._retire_spare()  # it holds the old contexts
            self._fork_spare()

    # -- taking a peer -----------------------------------------------------

    def ready_for_peer(self) -> bool:
        """True when a spare waits to serve the next peer (else the server pauses)."""
        if self.spare is None:
            self._fork_spare()
        return self.spare is not None

    def admits(self, ip: str, peer: str) -> bool:
        """The -c and -C limits: True if ``peer`` (from ``ip``) may be served; else a warning."""
        if len(self.children) >= self.maxconn:
            self.log.warn(f"peer {peer}: refused: too many connections (-c {self.maxconn})")
            return False
        if self.per_ip[ip] >= self.localmaxconn:
            limit = f"-C {self.localmaxconn}"
            self.log.warn(f"peer {peer}: refused: too many connections from {ip} ({limit})")
            return False
        return True

    def start_child(self, sock: socket.socket, env: dict[str, str], ip: str, port: int) -> None:
        """Hand ``sock`` and ``env`` to the spare, which serves the peer; close ``sock`` here.

        ``env`` gets ``PROTOCONNNUM`` (TCPCONNNUM...): the children already
        serving ``ip``.  The next spare is forked once ``sock`` is closed, so
        that it holds no copy.  A warning if no child could take it.
        """
        peer = peer_address(ip, port)
        env[f"{env['PROTO']}CONNNUM"] = str(self.per_ip[ip])
        with sock:
            handed = self._hand_over(sock.fileno(), env)
        if handed is None:
            self.log.warn(f"peer {peer}: refused: unable to start a child")
            return
        pid, channel = handed
        self.children[pid] = Child(peer, ip, channel)
        self.serving.add(peer)
        self.per_ip[ip] += 1
        count = f"{len(self.children)}/{self.maxconn}"
        self.log.info(f"allow {ip} port {port} pid {pid} count {count}")
        self._fork_spare()

    def trouble_with(self, what: str, exc: OSError, pause: bool) -> None:
        """A warning for an error of the loop, once until ``trouble_over``.

        With ``pause`` (out of descriptors, memory or processes), stop
        watching the listeners for ``PAUSE`` seconds: new peers wait in the
        kernel's queues instead of being taken and dropped.
        """
        if (what, exc.errno) != self.trouble:
            self.trouble = (what, exc.errno)
            then = f", pausing accepts for {PAUSE * 1000:.0f} ms" if pause else ""
            self.log.warn(f"{what}: {exc.strerror}{then}")
        if pause and self.paused_until is None and self.listeners:
            self._watch_listeners(False)
            self.paused_until = time.monotonic() + PAUSE

    def trouble_over(self) -> None:
        """The loop works again: the next error is worth a warning."""
        self.trouble = None

    def _timeout_ms(self) -> int | None:
        """Until the pause ends or the session ticket key must be replaced."""
        now = time.monotonic()
        rotation = now + self.setup.contexts.seconds_to_rotation()
        return wait_ms(earliest(rotation, self.paused_until), now)

    def _rotate_if_due(self) -> None:
        """A new session ticket key every 12 hours: new children get a new context."""
        if self.setup.contexts.rotate_if_due() and self.listeners:
            self._retire_spare()  # it holds the old key
            self._fork_spare()

    def _resume_if_due(self) -> None:
        if self.paused_until is not None and time.monotonic() >= self.paused_until:
            self.paused_until = None
            self._watch_listeners(True)

    def _hand_over(self, fd: int, env: dict[str, str]) -> tuple[int, socket.socket] | None:
        """Give ``fd`` and ``env`` to the spare: its pid and channel, or None."""
        for _attempt in range(2):
            if self.spare is None:
                self._fork_spare()
            if self.spare is None:
                return None
            pid, channel = self.spare
            self.spare = None
            try:
                spare.hand_over(channel, fd, env)
            except OSError:
                channel.close()
                continue  # the spare died: fork another one
            return pid, channel
        return None

    def _fork_spare(self) -> None:
        if self.spare is not None or not self.listeners:
            return
        try:
            self.spare = spare.fork(self._spare_main)
        except OSError as exc:
            self.trouble_with("unable to fork", exc, True)

    def _retire_spare(self) -> None:
        """Close the spare's channel: it exits without serving anything."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None

    def _spare_main(self, channel: socket.socket) -> NoReturn:
        """The spare child: warm up, wait for a peer, serve it, os._exit."""
        code = ExitCode.SYSTEM
        env: dict[str, str] = {}
        try:
            self.selfpipe.__exit__(None, None, None)  # the child's own signals are its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # in the handshake: die at once
            for listener in self.listeners:
                listener.close()
            spare.warm_up(self.setup.ctx)
            peer = spare.receive(channel)
            if peer is None:
                return _exit(ExitCode.OK)  # retired before it got a peer
            env, fd = peer
            code = self.serve_child(env, fd, channel)
        except BaseException as exc:  # whatever it is: one line, and the child still exits
            log = self.log_for(env)
            code, line = failure(exc)
            if isinstance(exc, Denied):
                log.info(line)
            else:
                log.warn(line)
                log.traceback()
        return _exit(code)

    def serve_peer(
        self, setup: Setup, env: dict[str, str], fd: int, channel: socket.socket, **extra: Any
    ) -> int:
        """In the child: serve the peer of ``env`` on ``fd``, prog on 0 and 1; the exit code.

        ``extra``: more arguments of ``Setup.serve_connection``.
        """
        return setup.serve_connection(
            fd,
            fd,
            app_fds=(0, 1),
            peer=peer_of(env, env["PROTO"]),
            on_handshake=lambda: spare.report_handshake(channel),
            **extra,
        )

    def log_for(self, env: dict[str, str]) -> Log:
        """The logger of the peer whose variables are ``env`` (``PROTO``, ``TCPREMOTEIP``...)."""
        peer = peer_of(env, env.get("PROTO", "TCP"))
        return self.log.about(peer, os.getpid()) if peer else self.log


def _exit(code: int) -> NoReturn:
    """A forked child always leaves this way: no atexit, no flush of the parent's buffers."""
    os._exit(code)


def _in_handshake(child: Child) -> bool:
    """True if ``child`` has not reported the end of its handshake (nor ended)."""
    if child.channel is None:
        return False
    if spare.in_handshake(child.channel):
        return True
    child.channel.close()
    child.channel = None
    return False

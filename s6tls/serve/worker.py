"""A worker of s6-tlsserver or s6-dtlsserver: many connections, one event loop.

The supervisor (``serve.supervisor``) forks the workers once the
configuration is read and the contexts are built; each worker drops to the
ids asked for, then serves until told to stop.  Its loop waits in one
``epoll`` on the listening sockets, the descriptors its connections wait
for, its selfpipe and the wake-up pipe of its thread pool, until the
earliest deadline of its connections; then it passes each event to the
connection it belongs to (``served.Served``), and keeps its registrations
and its timers in step with what the connection says it waits for.

What is a worker's own:

* taking connections: the server's ``take`` function is called when a
  listening socket is readable (``stream.accept``, ``datagram.receive``);
  admission is the shared table's (``admission``); a connection admitted
  gets an ``allow`` line, and its end an ``end`` line with the
  application's pid and the connection's exit code;
* its descriptor limit: a worker that could not open the descriptors of
  one more connection stops watching the listening sockets until one of
  its connections ends (``has_room``), so that the other workers take the
  new ones, or, all of them full, they wait in the kernel's queue;
* isolation: an exception while serving one connection ends that
  connection alone (``Served.abort``: logged with its peer, 111), never
  the worker;
* the applications: SIGCHLD reaps them (``waitpid`` of any child) and the
  connection of each is told;
* signals: SIGTERM (and SIGINT) stop taking connections and drop the early
  ones, SIGQUIT also sends SIGTERM to the applications, SIGHUP (a reload:
  newer workers take over) only stops taking connections; the worker exits
  0 once its last connection is over.  SIGUSR1 says that a connection of
  ours lost its slot (``admission``).  The stop is reported to the
  supervisor on the report pipe: ``stopped RUNNING DROPPED``;
* name look-ups and other blocking work run in a small thread pool
  (``submit``), whose results wake the loop through a pipe; connections
  from one address share one look-up.
"""

import contextlib
import errno
import heapq
import itertools
import os
import resource
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..cli import Log, plural
from ..deadline import earliest, wait_ms
from ..errors import ExitCode
from ..selfpipe import SelfPipe, read_signals
from ..tls.perclient import ClientContexts
from .admission import Reason, Table, Ticket
from .app import Inherited, reaped
from .served import Phase, Served

if TYPE_CHECKING:
    from ..net.gate import Gate
    from .connection import Setup

EPOLLIN = select.EPOLLIN
PAUSE = 0.1  # seconds without taking new connections after EMFILE and the like
PAUSING_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
POOL_THREADS = 16  # name look-ups at once, per worker
# Descriptors of a running connection: its socket, the application's two pipes.
FDS_PER_CONNECTION = 3
# Kept free besides: what a connection needs more while its application is
# spawned (the other ends of its pipes, their copies) and what the loop opens for
# a moment (a rules directory); and a socket per pool thread when names are looked up.
FDS_SPARE = 8
FULL_WARNING_EVERY = 10.0  # seconds: the most often a worker says it is full
SIGNALS = (
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
)

Take = Callable[["Worker", socket.socket], None]


class Worker:
    """One worker's loop; see the module docstring.

    Args:
        setup: the program's, with its contexts (built before the fork).
        table: the shared admission table; ``index`` is this worker's in it.
        listeners: the listening sockets (shared with the other workers).
        take: what to do when a listening socket is readable.
        report: the write end of this worker's report pipe to the supervisor.
        gate: s6-tlsserver's before TLS (None for s6-dtlsserver).
    """

    def __init__(
        self,
        setup: "Setup",
        table: Table,
        index: int,
        listeners: list[socket.socket],
        take: Take,
        report: int,
        gate: "Gate | None" = None,
    ) -> None:
        self.setup = setup
        self.log: Log = setup.log
        self.table = table
        self.index = index
        self.pid = os.getpid()
        self.listeners = listeners
        self.take = take
        self.report = report
        self.gate = gate
        self.inherited = Inherited(setup.environ, keep_secrets=setup.cfg.options.keep_env)
        self.client_contexts = ClientContexts("server", setup.cfg, setup.environ, self.log.warn)
        self.maxconn = table.maxconn
        self.epoll = select.epoll()
        self.conns: dict[int, Served] = {}  # its number (``Served.cid``) -> connection
        self.fds: dict[int, Served] = {}  # registered descriptor -> its connection
        self.registered: dict[int, dict[int, int]] = {}  # id -> {fd: events}
        self.apps: dict[int, Served] = {}  # application pid -> its connection
        self.timers: list[tuple[float, int, int]] = []  # (deadline, seq, id), lazily pruned
        self.timer_of: dict[int, float] = {}  # id -> the deadline in the heap
        self.busy: set[int] = set()  # connections to step again at once
        self.seq = itertools.count()  # of the timers, so that equal deadlines never compare more
        self.ids = itertools.count()  # of the connections
        self.stopping = False
        self.watching = False  # the listening sockets are in the epoll set
        self.full = False  # at the descriptor limit (``has_room``)
        self.full_said: float | None = None  # when that was last said
        self.base_fds = 0  # descriptors open before the first connection
        lookups = gate is not None and gate.access.dns
        self.fds_spare = FDS_SPARE + (POOL_THREADS if lookups else 0)
        self.paused_until: float | None = None
        self.trouble: tuple[str, int | None] | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.jobs: dict[object, list[tuple[int, Callable[[Any], None]]]] = {}  # key -> waiting
        self.done_jobs: deque[tuple[object, Any]] = deque()  # (key, outcome), from the pool
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.evictions = False  # a connection of ours lost its slot: drop it

    # -- the loop -------------------------------------------------------------------

    def serve(self) -> int:
        """Serve until stopped and every connection is over; return 0."""
        with SelfPipe(SIGNALS) as selfpipe:
            self.selfpipe = selfpipe.fileno()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across the fork
            self.epoll.register(self.selfpipe, EPOLLIN)
            self.epoll.register(self.wake_r, EPOLLIN)
            self.base_fds = len(os.listdir("/proc/self/fd")) - 1  # not listdir's own
            self._listen()
            while self.listeners or self.conns:
                self._once()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        return 0

    def _once(self) -> None:
        now = time.monotonic()
        timeout = 0 if self.busy else self._timeout_ms(now)
        try:
            events = self.epoll.poll(-1 if timeout is None else timeout / 1000)
        except InterruptedError:
            events = []
        for fd, revents in events:
            if fd == self.selfpipe:
                self._on_signals(read_signals(fd))
            elif fd == self.wake_r:
                self._on_jobs()
            elif (conn := self.fds.get(fd)) is not None:
                self._guarded(conn, conn.on_ready, fd, revents)
            else:
                listener = next((s for s in self.listeners if s.fileno() == fd), None)
                if listener is not None and not self.stopping:
                    self.take(self, listener)
                    if self.evictions:  # ours made room: drop them now, their slots back
                        self.drop_evicted()
        for cid in list(self.busy):
            conn = self.conns.get(cid)
            self.busy.discard(cid)
            if conn is not None:
                self._guarded(conn, conn.step)
        self._run_timers(time.monotonic())
        self._resume_if_due()

    def _timeout_ms(self, now: float) -> int | None:
        while self.timers:
            when, _seq, cid = self.timers[0]
            if self.timer_of.get(cid) == when:
                break
            heapq.heappop(self.timers)  # stale: the connection's deadline moved, or it ended
        first = self.timers[0][0] if self.timers else None
        return wait_ms(earliest(first, self.paused_until), now)

    def _run_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            when, _seq, cid = heapq.heappop(self.timers)
            if self.timer_of.get(cid) != when:
                continue
            del self.timer_of[cid]
            conn = self.conns.get(cid)
            if conn is not None:
                self._guarded(conn, conn.on_time, now)

    # -- connections --------------------------------------------------------------------

    def add(self, conn: Served) -> None:
        """Serve ``conn``, just admitted: its ``allow`` line, then its start."""
        cid = conn.cid = next(self.ids)
        self.conns[cid] = conn
        self.registered[cid] = {}
        ip, _, port = conn.peer.rpartition(":")
        count = f"{conn.ticket.count}/{self.maxconn}"
        self.log.info(f"allow {ip.strip('[]')} port {port} count {count}")
        self._guarded(conn, conn.start)

    def _guarded(self, conn: Served, method: Callable[..., None], *args: Any) -> None:
        """``method(*args)`` of ``conn``; whatever it raises ends ``conn`` alone.  Then sync."""
        try:
            method(*args)
        except BaseException as exc:  # the connection's failure, never the worker's
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            try:
                conn.abort(exc)
            except BaseException as again:  # its own end failed too: forget it, loudly
                if isinstance(again, KeyboardInterrupt | SystemExit):
                    raise
                conn.log.warn(f"unable to end the connection: {type(again).__name__}: {again}")
                conn.phase = Phase.DONE
                conn.code = ExitCode.SYSTEM
        self._sync(conn)

    def _sync(self, conn: Served) -> None:
        """Registrations and timer as ``conn`` says now; forget it once it is done."""
        cid = conn.cid
        if cid not in self.conns:
            return
        done = conn.code is not None
        wanted = {} if done else conn.waits()
        old = self.registered[cid]
        for fd in old.keys() - wanted.keys():
            if self.fds.get(fd) is conn:
                del self.fds[fd]
                with contextlib.suppress(OSError):  # closed already: epoll forgot it
                    self.epoll.unregister(fd)
        for fd, events in wanted.items():
            if old.get(fd) != events or self.fds.get(fd) is not conn:
                self._register(fd, events)
                self.fds[fd] = conn
        self.registered[cid] = dict(wanted)
        if conn.again and not done:
            self.busy.add(cid)
        self._schedule(cid, None if done else conn.deadline())
        if done and (conn.app is None or conn.app.pid not in self.apps):
            self._forget(conn)

    def _schedule(self, cid: int, when: float | None) -> None:
        """Wake connection ``cid`` at ``when`` (None: never).

        A deadline that moves later (an idle timeout, each time data moves)
        keeps the entry already in the heap: when it comes, the connection is
        asked, and tells its real deadline then.  So the heap holds about one
        entry per connection, however busy; entries left by connections that
        ended are dropped once they are half of it.
        """
        scheduled = self.timer_of.get(cid)
        if when is None:
            self.timer_of.pop(cid, None)
        elif scheduled is None or when < scheduled:
            self.timer_of[cid] = when
            heapq.heappush(self.timers, (when, next(self.seq), cid))
            if len(self.timers) > 2 * len(self.timer_of) + 64:  # mostly stale: rebuild
                self.timers = [t for t in self.timers if self.timer_of.get(t[2]) == t[0]]
                heapq.heapify(self.timers)

    def _register(self, fd: int, events: int) -> None:
        """Wait for ``events`` on ``fd``: modified if we registered it, else registered.

        What we believe may be stale (a descriptor closed, its number
        reused): the other call then does it.
        """
        first, then = (
            (self.epoll.modify, self.epoll.register)
            if fd in self.fds
            else (self.epoll.register, self.epoll.modify)
        )
        try:
            first(fd, events)
        except (FileNotFoundError, FileExistsError):
            then(fd, events)

    def _forget(self, conn: Served) -> None:
        """``conn`` is over: its slot goes back, its ``end`` line."""
        cid = conn.cid
        del self.conns[cid]
        if self.full and self._fits():
            self.full = False
            self._listen()
        del self.registered[cid]
        self.timer_of.pop(cid, None)
        self.busy.discard(cid)
        count = self.table.release(conn.ticket)
        ip, _, port = conn.peer.rpartition(":")
        pid = conn.app_pid if conn.app_pid is not None else "-"
        self.log.info(
            f"end {ip.strip('[]')} port {port} pid {pid} status {conn.code}"
            f" count {count}/{self.maxconn}"
        )

    def watch_app(self, pid: int, conn: Served) -> None:
        """``conn``'s application is ``pid``: its exit is ``conn``'s to hear."""
        self.apps[pid] = conn

    def admit(self, ip: str, port: int, *, unique: bool = False) -> Ticket | None:
        """A slot for a connection from ``ip``:``port``, or None (refused, counted)."""
        outcome = self.table.admit(ip, port, self.index, self._evicted, unique=unique)
        return outcome if isinstance(outcome, Ticket) else None

    def _evicted(self, pid: int, _slot: int, _generation: int) -> None:
        """A connection lost its slot: its worker hears of it (SIGUSR1), ours at once."""
        if pid == self.pid:
            self.evictions = True
        elif pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def drop_evicted(self) -> None:
        """Drop our early connections that lost their slot."""
        self.evictions = False
        for conn in [c for c in self.conns.values() if c.early]:
            if self.table.evicted(conn.ticket):
                self._guarded(conn, conn.drop, "in the handshake, to make room")

    # -- the thread pool ---------------------------------------------------------------

    def submit(
        self, conn: Served, job: Callable[[], Any], then: Callable[[Any], None], key: object
    ) -> None:
        """Run ``job()`` in the pool; then ``then(outcome)`` in the loop, for ``conn``.

        ``outcome`` is what ``job`` returned, or the exception it raised.
        Connections that submit a job of the same ``key`` while one runs
        share its outcome (a flood from one address costs one look-up).
        Nothing is called for a connection that is over by then.
        """
        waiting = self.jobs.get(key)
        if waiting is not None:
            waiting.append((conn.cid, then))
            return
        self.jobs[key] = [(conn.cid, then)]
        if self.pool is None:
            self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="s6tls-lookup")

        def run() -> None:
            try:
                outcome: Any = job()
            except BaseException as exc:
                outcome = exc
            self.done_jobs.append((key, outcome))
            with contextlib.suppress(BlockingIOError):
                os.write(self.wake_w, b"j")

        self.pool.submit(run)

    def _on_jobs(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 256):
                pass
        while self.done_jobs:
            key, outcome = self.done_jobs.popleft()
            for cid, then in self.jobs.pop(key, []):
                conn = self.conns.get(cid)
                if conn is not None and conn.code is None:
                    self._guarded(conn, then, outcome)

    # -- signals -----------------------------------------------------------------------------

    def _on_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGUSR1:
                self.drop_evicted()
            elif sig == signal.SIGHUP:
                self._stop(drop=False)
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._stop(drop=True)
                if sig == signal.SIGQUIT:
                    for conn in list(self.conns.values()):
                        self._guarded(conn, conn.on_signal, signal.SIGTERM)
        if self.evictions:
            self.drop_evicted()

    def _reap(self) -> None:
        for pid, status in reaped():
            conn = self.apps.pop(pid, None)
            if conn is None:
                continue
            if conn.code is None:
                self._guarded(conn, conn.on_exit, status)
            else:
                self._sync(conn)

    def _stop(self, drop: bool) -> None:
        """Stop taking connections; with ``drop``, drop the early ones.  Report each time.

        A worker told to stop taking connections (SIGHUP) may later be told
        to stop (SIGTERM): the supervisor waits for both reports.
        """
        if not self.stopping:
            self.stopping = True
            self._listen()
            for listener in self.listeners:
                listener.close()
            self.listeners = []
        dropped = self._drop_early() if drop else 0
        running = len(self.conns)
        with contextlib.suppress(OSError):  # the supervisor is gone: nothing to tell
            os.write(self.report, f"stopped {running} {dropped}\n".encode())

    def _drop_early(self) -> int:
        early = [c for c in self.conns.values() if c.early]
        for conn in early:
            self._guarded(conn, conn.drop, "in the handshake")
        return len(early)

    # -- taking connections -------------------------------------------------------------

    def _listen(self) -> None:
        """Watch the listening sockets exactly when taking connections.

        That is: not stopping, not pausing after an error, not full.
        """
        watch = bool(self.listeners) and not (
            self.stopping or self.full or self.paused_until is not None
        )
        if watch == self.watching:
            return
        self.watching = watch
        for listener in self.listeners:
            if watch:
                self.epoll.register(listener.fileno(), EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(listener.fileno())

    def has_room(self) -> bool:
        """True if the descriptors of one more connection fit in our limit (ulimit -n).

        A connection counts ``FDS_PER_CONNECTION`` over what the worker had
        open before its first one, and ``FDS_SPARE`` stay free (and one per
        pool thread when names are looked up).  When one more does not fit,
        the worker is full: it stops watching the listening sockets (the
        other workers take the new connections, or they wait in the kernel's
        queue) until one of its connections ends, and says so in one
        warning, at most every ``FULL_WARNING_EVERY``.  A worker without
        connections always tries (if not even one fits, accepting fails and
        it pauses: ``trouble_with``).
        """
        if self._fits():
            return True
        if not self.full:
            self.full = True
            self._listen()
            now = time.monotonic()
            if self.full_said is None or now >= self.full_said + FULL_WARNING_EVERY:
                self.full_said = now
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                self.log.warn(
                    f"{plural(len(self.conns), 'connection')} reach the descriptor limit"
                    f" of {limit}: not taking more until one ends"
                )
        return False

    def _fits(self) -> bool:
        if not self.conns:
            return True
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        needed = self.base_fds + FDS_PER_CONNECTION * (len(self.conns) + 1) + self.fds_spare
        return limit == resource.RLIM_INFINITY or needed <= limit

    def trouble_with(self, what: str, exc: OSError, pause: bool) -> None:
        """A warning for an error of the loop, once until ``trouble_over``.

        With ``pause`` (out of descriptors, memory or processes), stop
        watching the listeners for ``PAUSE`` seconds: new connections wait in
        the kernel's queues instead of being taken and dropped.
        """
        if (what, exc.errno) != self.trouble:
            self.trouble = (what, exc.errno)
            then = f", pausing accepts for {PAUSE * 1000:.0f} ms" if pause else ""
            self.log.warn(f"{what}: {exc.strerror}{then}")
        if pause and self.paused_until is None and self.listeners:
            self.paused_until = time.monotonic() + PAUSE
            self._listen()

    def trouble_over(self) -> None:
        """Taking connections works again: the next error is worth a warning."""
        self.trouble = None

    def _resume_if_due(self) -> None:
        if self.paused_until is not None and time.monotonic() >= self.paused_until:
            self.paused_until = None
            self._listen()


def summary_line(counts: Mapping[Reason, int], seconds: float, maxconn: int, local: int) -> str:
    """The one line that sums up the refusals and evictions of ``seconds``.

    ``refused 3 connections (2 over -c 40, 1 over -C 40); dropped 5 early
    connections (5 for -C 40) in the last 10 s``: an early connection is
    dropped to make room for a new one.
    """

    def part(verb: str, noun: str, whole: Reason, address: Reason, word: str) -> str | None:
        why = [
            f"{counts[reason]} {word} {flag}"
            for reason, flag in ((whole, f"-c {maxconn}"), (address, f"-C {local}"))
            if counts.get(reason)
        ]
        total = counts.get(whole, 0) + counts.get(address, 0)
        return f"{verb} {plural(total, noun)} ({', '.join(why)})" if total else None

    parts = [
        part("refused", "connection", Reason.REFUSED_ALL, Reason.REFUSED_ADDRESS, "over"),
        part("dropped", "early connection", Reason.EVICTED_ALL, Reason.EVICTED_ADDRESS, "for"),
    ]
    said = "; ".join(p for p in parts if p)
    return f"{said} in the last {max(1, round(seconds))} s"

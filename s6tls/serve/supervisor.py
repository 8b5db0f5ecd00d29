"""The supervisor of s6-tlsserver and s6-dtlsserver: it listens, and keeps its workers alive.

The supervisor is the process the user started.  It has the listening
sockets (bound by the program, or systemd's), the configuration and the
contexts, all checked before readiness.  It then forks ``--workers``
workers (``serve.worker``), which drop to the ids asked for and serve the
connections; it serves none itself, and stays what it was (root, when ids
are asked for), so that it can read the files again on SIGHUP.

* Readiness (-1): the port and a newline on stdout, and ``READY=1`` to
  systemd's ``NOTIFY_SOCKET``, once listening with the workers started;
  stdin and stdout then go to /dev/null, as s6-tcpserver's do (the
  workers' at once).
* SIGHUP: the files are read again into new contexts (a failure keeps the
  old ones, with a warning); new workers are forked with them, and the old
  ones stop taking connections and end once theirs are over: no connection
  is dropped.  ``reloaded the keypairs`` is logged once no old worker takes
  a new connection.  The session ticket key changes with them, and at least every
  12 hours the same way.
* SIGTERM, SIGINT: the listening stops; every worker drops the connections
  still before TLS or in their handshake and lets the running ones finish;
  one line sums it up.  SIGQUIT also sends SIGTERM to the applications.
  The supervisor exits 0 once every worker has.
* A worker that dies is logged and replaced; its slots in the admission
  table are freed, and its applications see EOF.  The supervisor is a
  child subreaper: it reaps the applications a dead worker leaves.
* Refusals and evictions of the admission table (-c, -C) are summed up in
  one line per ``SUMMARY_INTERVAL``, never one per connection.

Signals are blocked across each fork, until the worker has its own
handlers: none is lost, none reaches the wrong handler.
"""

import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass

from ..cli import Log, failure, plural
from ..deadline import earliest, wait_ms
from ..errors import ExitCode, S6tlsError
from ..net import systemd
from ..net.gate import Gate
from ..net.ucspi import peer_address, unmap
from ..selfpipe import SelfPipe
from .admission import Reason, Table
from .app import exit_code, reaped
from .connection import Setup
from .worker import SIGNALS as WORKER_SIGNALS
from .worker import Take, Worker, summary_line

SUMMARY_INTERVAL = 10.0  # seconds: at most one line of refusals and evictions per interval
LOOK_INTERVAL = 1.0  # seconds between two looks at the admission table's counts
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class WorkerProcess:
    """A worker as the supervisor knows it."""

    pid: int
    index: int  # its index in the admission table
    report: int  # the read end of its report pipe
    retired: bool = False  # told to stop taking connections (SIGHUP, SIGTERM)
    buffer: bytes = b""  # what it reported, up to its next newline


def worker_count(asked: int | None) -> int:
    """``--workers``, or one per CPU this process may run on."""
    return asked or len(os.sched_getaffinity(0)) or 1


class Supervisor:
    """The supervisor's loop; see the module docstring.

    Args:
        setup: the program's, contexts built.
        listeners: the listening sockets; ``bound``: ours (else systemd's,
            which must go on listening for the next start).
        take: what a worker does when a listening socket is readable.
        gate: s6-tlsserver's before TLS, for its workers (None for DTLS).
        workers: how many workers serve at once.
    """

    def __init__(
        self,
        setup: Setup,
        listeners: list[socket.socket],
        bound: bool,
        take: Take,
        gate: Gate | None,
        workers: int,
    ) -> None:
        self.setup = setup
        self.log: Log = setup.log
        self.listeners = listeners
        self.bound = bound
        self.take = take
        self.gate = gate
        self.wanted = workers
        settings = setup.settings
        self.table = Table(settings.maxconn, settings.localmaxconn, max(64, 8 * workers))
        self.workers: dict[int, WorkerProcess] = {}  # pid -> worker
        self.free_indexes = list(reversed(range(max(64, 8 * workers))))
        # systemd's readiness socket: ours, told once the workers are up; never theirs
        self.ready_to = {"NOTIFY_SOCKET": setup.environ.pop("NOTIFY_SOCKET", "")}
        self.rolling: set[int] = set()  # old workers yet to stop taking connections
        self.roll_line: str | None = None  # logged once they all did
        self.stopping = False
        self.unreported: set[int] | None = None  # at a stop: the workers yet to report
        self.stopped = [0, 0]  # what they reported: connections running, handshakes dropped
        now = time.monotonic()
        self.look_at = now + LOOK_INTERVAL  # the next look at the table's counts
        self.line_at = now  # no summary line before then
        self.since = now  # what ``pending`` counts started then
        self.pending: Counter[Reason] = Counter()

    # -- the loop ---------------------------------------------------------------

    def serve(self, notify: bool) -> int:
        """Start the workers and supervise them until they are all gone; return 0."""
        signals = (signal.SIGCHLD, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP, signal.SIGINT)
        _become_subreaper()
        with SelfPipe(signals) as selfpipe:
            self.selfpipe = selfpipe
            gc.freeze()  # keep the pages shared with the workers shared
            for _ in range(self.wanted):
                self._fork_worker()
            self._ready(notify)
            while self.listeners or self.workers:
                self._once()
        return ExitCode.OK

    def _once(self) -> None:
        poller = select.poll()
        poller.register(self.selfpipe.fileno(), select.POLLIN)
        reports = {w.report: w for w in self.workers.values()}
        for fd in reports:
            poller.register(fd, select.POLLIN)
        now = time.monotonic()
        rotation = None if self.stopping else now + self.setup.contexts.seconds_to_rotation()
        for fd, _events in poller.poll(wait_ms(earliest(self.look_at, rotation), now)):
            if fd == self.selfpipe.fileno():
                self._on_signals(self.selfpipe.read())
            elif fd in reports and reports[fd].pid in self.workers:  # not reaped meanwhile
                self._read_report(reports[fd])
        now = time.monotonic()
        if now >= self.look_at:
            self._summarise(now)
            self.look_at = now + LOOK_INTERVAL
        if not self.stopping and self.setup.contexts.rotate_if_due():
            self._roll()
        self._log_stop_if_done()

    def _ready(self, notify: bool) -> None:
        """Tell whoever waits that the server listens and its workers are started;
        then detach stdin and stdout."""
        null = os.open(os.devnull, os.O_RDWR)  # before readiness: no failure after it
        local = self.listeners[0].getsockname()
        self.log.info(f"listening on {peer_address(unmap(local[0]), local[1])}")
        if notify:
            try:
                os.write(1, f"{local[1]}\n".encode())
            except OSError as exc:
                self.log.warn(f"unable to notify readiness: {exc.strerror}")
        problem = systemd.notify(self.ready_to, "READY=1")
        if problem:
            self.log.warn(problem)
        _detach_stdio(null)

    def _summarise(self, now: float) -> None:
        """One line for the refusals and evictions counted, at most every ``SUMMARY_INTERVAL``.

        The first after a quiet interval comes within ``LOOK_INTERVAL``.
        """
        self.pending.update(self.table.take_counts())
        if not self.pending:
            self.since = now
            return
        if now < self.line_at:
            return
        s = self.setup.settings
        self.log.warn(summary_line(self.pending, now - self.since, s.maxconn, s.localmaxconn))
        self.pending.clear()
        self.since = now
        self.line_at = now + SUMMARY_INTERVAL

    # -- the workers -------------------------------------------------------------------

    def _fork_worker(self) -> None:
        """A new worker with the current contexts; a warning if none can be started."""
        if not self.free_indexes:
            self.log.warn("unable to start a worker: too many still finishing old connections")
            return
        index = self.free_indexes.pop()
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        supervisor = os.getpid()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(report_r)
            os.close(report_w)
            self.free_indexes.append(index)
            self.log.warn(f"unable to fork a worker: {exc.strerror}")
            return
        if pid == 0:
            os.close(report_r)
            self._worker_main(index, report_w, supervisor)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(report_w)
        self.table.register(index, pid)
        self.workers[pid] = WorkerProcess(pid, index, report_r)

    def _worker_main(self, index: int, report: int, supervisor: int) -> None:
        """In the worker: leave the supervisor's signals, drop privileges, serve, exit.

        A worker whose supervisor dies gets SIGTERM: it stops as at a stop,
        so that it never keeps the listening socket of a server that is gone.
        """
        code: int = ExitCode.SYSTEM
        try:
            for other in self.workers.values():
                os.close(other.report)
            _detach_stdio()  # the readiness pipe is the supervisor's to write, and close
            self.selfpipe.__exit__(None, None, None)  # its handlers and pipe are not ours
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != supervisor:  # it died before that: as if told
                os.kill(os.getpid(), signal.SIGTERM)
            self.table.register(index, os.getpid())
            self.setup.drop_privileges()
            worker = Worker(
                self.setup, self.table, index, self.listeners, self.take, report, self.gate
            )
            code = worker.serve()
        except BaseException as exc:  # whatever it is: one line, and the worker still exits
            code, line = failure(exc)
            self.log.fatal(f"worker: {line}")
            self.log.traceback()
        finally:
            os._exit(code)

    def _reap(self) -> None:
        for pid, status in reaped():
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue  # an application a dead worker left behind
            self._read_report(worker)  # what it said before it went
            if self.unreported is not None:
                self.unreported.discard(pid)  # a worker that died runs nothing any more
            self._rolled(pid)
            os.close(worker.report)
            self.table.release_worker(worker.index)
            self.free_indexes.append(worker.index)
            if status != 0:  # a worker ends by itself only once its connections did
                self.log.warn(f"worker {pid} ended with status {exit_code(status)}")
            if not self.stopping and not worker.retired:
                self._fork_worker()

    def _read_report(self, worker: WorkerProcess) -> None:
        """What ``worker`` wrote on its report pipe: ``stopped RUNNING DROPPED`` lines."""
        with contextlib.suppress(BlockingIOError):
            worker.buffer += os.read(worker.report, 256)
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            words = line.split()
            if words[:1] == [b"stopped"]:
                self._rolled(worker.pid)
            unreported = self.unreported or set()
            if len(words) == 3 and words[0] == b"stopped" and worker.pid in unreported:
                unreported.discard(worker.pid)
                self.stopped[0] += int(words[1])
                self.stopped[1] += int(words[2])

    # -- signals ---------------------------------------------------------------------------

    def _on_signals(self, signals: list[int]) -> None:
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._stop(sig)
        self._reap()

    def _stop(self, sig: int) -> None:
        """Stop listening; the workers drop their early connections (and more for SIGQUIT)."""
        if not self.stopping:
            self.stopping = True
            self.unreported = set(self.workers)
            for listener in self.listeners:
                # shutdown() stops the listening for every worker at once; never on
                # systemd's sockets, which must go on listening for the next start.
                if self.bound:
                    with contextlib.suppress(OSError):  # ENOTCONN: a UDP socket
                        listener.shutdown(socket.SHUT_RDWR)
                listener.close()
            self.listeners = []
        for worker in self.workers.values():
            worker.retired = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGQUIT if sig == signal.SIGQUIT else signal.SIGTERM)

    def _log_stop_if_done(self) -> None:
        """Once every worker said how it stopped (or died): the one line."""
        if self.unreported is None or self.unreported:
            return
        self.unreported = None
        self.stopped, (running, dropped) = [-1, -1], self.stopped  # logged once
        self.log.info(
            f"stopped accepting, {plural(running, 'connection')} running,"
            f" {plural(dropped, 'handshake')} dropped"
        )

    def _reload(self) -> None:
        try:
            self.setup.contexts.reload()
        except S6tlsError as exc:
            self.log.warn(f"unable to reload the keypairs, keeping the old ones: {exc}")
            return
        if self.stopping:
            self.log.info("reloaded the keypairs")
        else:
            self._roll("reloaded the keypairs")

    def _roll(self, line: str | None = None) -> None:
        """New workers with the current contexts; the old ones finish and go.

        ``line`` is logged once no old worker takes a new connection any
        more: from then on every new connection has the new contexts.
        """
        old = [w for w in self.workers.values() if not w.retired]
        for _ in range(self.wanted):
            self._fork_worker()
        self.rolling = {w.pid for w in old}
        self.roll_line = line
        for worker in old:
            worker.retired = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGHUP)
        self._rolled(None)

    def _rolled(self, pid: int | None) -> None:
        """Worker ``pid`` stopped taking connections, or died (None: neither).

        Once every old worker did, the line of the roll is logged.
        """
        if pid is not None:
            self.rolling.discard(pid)
        if not self.rolling and self.roll_line is not None:
            self.log.info(self.roll_line)
            self.roll_line = None


def _detach_stdio(null: int | None = None) -> None:
    """Close stdin and stdout as s6-tcpserver does, keeping the numbers on /dev/null.

    ``null``: a descriptor of /dev/null, closed here (else one is opened).
    """
    if null is None:
        null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


def _become_subreaper() -> None:
    """Reap the orphans of our subtree (the applications of a worker that died)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    """Linux's prctl(2) with one argument; nothing where it cannot be called."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)

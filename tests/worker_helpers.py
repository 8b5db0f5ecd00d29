"""s6-tlsserver's pool of workers under test: its processes, its log, many TLS clients at once.

* ``Server``: s6-tlsserver as a command (``Server.start``), or as the test's
  own code in a forked child (``Server.fork``), for the tests that patch the
  server's code in that child.  It runs in a session of its own: ``close``
  kills the whole group (supervisor, workers, applications) and reaps the
  supervisor, whatever state the test left it in.
* ``Lines``: the lines of a descriptor (the server's log; ``Reports``, a FIFO
  the applications write to), read all along by a thread, so that a busy
  server never blocks on a full pipe; ``wait`` waits for lines with a deadline.
* ``Client``, ``Echo``, ``Holder`` and ``Loop``: many TLS clients on memory
  BIOs over non-blocking sockets, driven by one poll loop, in the test's
  thread or in a thread of their own.
* ``wait_reaped``: the kernel says (pidfd) when a process has been reaped.

Nothing sleeps to synchronise: every wait is on a descriptor, with a deadline
(``wait_listening`` alone looks at /proc again and again: no event says that a
worker is in its loop).
"""

import contextlib
import errno
import hashlib
import os
import random
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from forked import forked_main
from OpenSSL import SSL
from server_helpers import child_pids, start_server
from ucspi_helpers import LineReader

import s6tls.tlsserver  # imported here, so that a forked server imports nothing

CHUNK = 16_384  # what a streaming client writes at once
WINDOW = 262_144  # the most a streaming client has sent and not yet read back
# The supervisor's sum of refusals and evictions; each part is optional.
SUMMARY = re.compile(
    r"warning: (?:refused (\d+) connections? \(([^)]*)\))?(?:; )?"
    r"(?:dropped (\d+) early connections? \(([^)]*)\))? in the last \d+ s$"
)


class Lines:
    """The lines written on descriptor ``fd``, gathered by a thread until EOF or ``close``.

    Takes ownership of ``fd``.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self.ended = False
        self._cond = threading.Condition()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._gather, daemon=True)
        self._thread.start()

    def _gather(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        rest = b""
        while not any(fd == self._stop_r for fd, _ in poller.poll()):
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            with self._cond:
                self.lines += [line.decode(errors="replace") for line in lines]
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match]:
        """The matches of ``pattern`` (a regex) in the lines so far, once there are ``count``."""
        regex = re.compile(pattern)
        found: list[re.Match] = []
        seen = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found += [m for line in self.lines[seen:] if (m := regex.search(line))]
                seen = len(self.lines)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    tail = "\n".join(self.lines[-20:])
                    raise AssertionError(
                        f"{len(found)} of {count} lines matching {pattern!r}"
                        f" {'at EOF' if self.ended else f'within {timeout} s'}; last lines:\n{tail}"
                    )
                self._cond.wait(left)

    def matching(self, pattern: str) -> list[re.Match]:
        """The matches of ``pattern`` in the lines so far."""
        regex = re.compile(pattern)
        with self._cond:
            return [m for line in self.lines if (m := regex.search(line))]

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=10)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


class Reports(Lines):
    """A FIFO at ``path`` for the applications' lines, open for reading (and for
    writing, so that no application's end is our EOF)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))


class Server:
    """An s6-tlsserver under test, in a session (process group) of its own.

    ``pid`` is the supervisor's; ``log`` its stderr (and its workers'), read
    all along.  Use it as a context manager: ``close`` at the end.
    """

    def __init__(self, pid: int, port: int, log: Lines, reap: Callable[[float], int]) -> None:
        self.pid = pid
        self.port = port
        self.log = log
        self._reap = reap
        self.code: int | None = None
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def start(cls, args: Sequence[str], prog: Sequence[str], env: Mapping[str, str]) -> "Server":
        """``s6-tlsserver -1 args 127.0.0.1 0 prog``, once it listens."""
        proc, port = start_server(args, prog, env, new_session=True)
        assert proc.stderr is not None
        return cls(proc.pid, port, Lines(os.dup(proc.stderr.fileno())), proc.wait)

    @classmethod
    def fork(
        cls,
        args: Sequence[str],
        prog: Sequence[str],
        env: Mapping[str, str],
        prepare: Callable[[], None],
    ) -> "Server":
        """``s6tls.tlsserver.main`` in a forked child of the test, after ``prepare()`` there.

        ``prepare`` patches the server's code in the child only (the
        workers, forked from it, inherit the patches).
        """
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR)
        pid = forked_main(
            s6tls.tlsserver.main,
            ["-1", *args, "127.0.0.1", "0", *prog],
            env,
            [(null, 0), (out_w, 1), (err_w, 2)],
            close=(out_r, err_r),
            new_session=True,
            prepare=prepare,
        )
        os.close(null)
        os.close(out_w)
        os.close(err_w)
        log = Lines(err_r)
        with open(out_r, "rb", buffering=0) as out:
            line = LineReader(out).readline(timeout=30)

        def reap(timeout: float) -> int:
            if not select.select([server.pidfd], [], [], timeout)[0]:
                raise AssertionError(f"the server {pid} did not exit within {timeout} s")
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        server = cls(pid, 0, log, reap)
        if not line.isdigit():
            server.close()
            raise AssertionError(f"the server did not start: {line!r} {log.lines}")
        server.port = int(line)
        return server

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workers(self) -> list[int]:
        """The supervisor's children that are its workers (forked: the same command line).

        Its other children are the applications a dead worker left behind.
        """
        mine = _cmdline(self.pid)
        return sorted(pid for pid in child_pids(self.pid) if _cmdline(pid) == mine)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the server's exit; its exit code."""
        os.kill(self.pid, sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the server's exit; its exit code."""
        self.code = self._reap(timeout)
        return self.code

    def close(self) -> None:
        """Kill the whole group (supervisor, workers, applications); reap the supervisor."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.code is None:
            with contextlib.suppress(ChildProcessError):
                self.code = self._reap(30)
        os.close(self.pidfd)
        self.log.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_reaped(pids: Iterable[int], timeout: float = 30) -> None:
    """Wait until every process of ``pids`` has been reaped by its parent, whoever that is.

    The kernel reports POLLHUP on a pidfd once its process is reaped (pidfs,
    Linux 6.9 and later); on an older kernel, wait for the exit (POLLIN) and
    then look at /proc until the entry goes.
    """
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # reaped already
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                pending = {pid: process_state(pid) for pid in fds.values()}
                raise AssertionError(f"not reaped within {timeout} s: {pending}")
            for fd, revents in poller.poll(left * 1000):
                gone = _POLLHUP_WHEN_REAPED or process_state(fds[fd]) is None
                if gone and revents & (select.POLLHUP if _POLLHUP_WHEN_REAPED else select.POLLIN):
                    poller.unregister(fd)
                    os.close(fd)
                    del fds[fd]
            if fds and not _POLLHUP_WHEN_REAPED:
                time.sleep(0.01)  # old kernels only: no event says "reaped"
    finally:
        for fd in fds:
            os.close(fd)


def wait_listening(pids: Iterable[int], timeout: float = 30) -> None:
    """Wait until each worker of ``pids`` is in its loop: its epoll set watches its
    selfpipe, its pool's wake-up pipe and a listening socket (three ``tfd`` lines in
    the epoll descriptor's fdinfo).  No event says so: /proc is looked at again
    every 10 ms, until the deadline."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _epoll_targets(pid) < 3:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {pid} not listening within {timeout} s")
            time.sleep(0.01)


def _epoll_targets(pid: int) -> int:
    """How many descriptors the epoll set of ``pid`` watches (0 without one)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return sum(line.startswith("tfd:") for line in info.splitlines())
    return 0


def process_state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _pollhup_when_reaped() -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    fd = os.pidfd_open(pid)
    os.waitpid(pid, 0)
    try:
        poller = select.poll()
        poller.register(fd, 0)
        return bool(poller.poll(0))
    finally:
        os.close(fd)


_POLLHUP_WHEN_REAPED = _pollhup_when_reaped()


# -- clients ------------------------------------------------------------------------------


def client_socket(port: int, source: str = "127.0.0.1", *, wait: bool = True) -> socket.socket:
    """A TCP socket bound to ``source`` (its port is known before it connects), connecting.

    ``wait``: connected when returned; else the connection is under way (a
    ``Client`` sends its hello once the socket is writable).
    """
    sock = socket.socket()
    sock.bind((source, 0))
    if wait:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
    else:
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        assert code == errno.EINPROGRESS, os.strerror(code)
    return sock


class Client:
    """A TLS client on memory BIOs over non-blocking ``sock``, for ``Loop``.

    Subclasses say what it does once the handshake is done (``talk``).
    ``ending``: how the connection ended for it ("eof" for a close_notify
    or a bare EOF, "reset", or the TLS error), None while it runs.
    """

    def __init__(self, ctx: SSL.Context, sock: socket.socket) -> None:
        self.sock = sock
        self.ip, self.port = sock.getsockname()[:2]
        sock.setblocking(False)
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.conn.set_tlsext_host_name(b"localhost")
        self.out = bytearray()  # ciphertext for the socket
        self.handshaken = False
        self.ending: str | None = None
        self.closed = False

    # what the loop asks
    def fileno(self) -> int:
        return self.sock.fileno()

    def events(self) -> int:
        return (select.POLLIN if self.ending is None else 0) | (select.POLLOUT if self.out else 0)

    @property
    def done(self) -> bool:
        return self.ending is not None and not self.out

    def on_event(self, revents: int) -> None:
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._read_socket()
        self.step()

    def step(self) -> None:
        """Move as far as possible without waiting."""
        if self.ending is None:
            try:
                if not self.handshaken:
                    self.conn.do_handshake()
                    self.handshaken = True
                self.talk()
            except SSL.WantReadError:
                pass
            except SSL.ZeroReturnError:
                self.ending = "eof"
            except SSL.Error as exc:
                self.ending = f"error: {exc}"
        with contextlib.suppress(SSL.WantReadError):
            while True:
                self.out += self.conn.bio_read(1 << 16)
        self._write_socket()

    def talk(self) -> None:
        """Once the handshake is done: send and receive (raising ``SSL.WantReadError``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the socket (a bare FIN)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    # the socket
    def _read_socket(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError as exc:
            self.ending = self.ending or ("reset" if exc.errno == errno.ECONNRESET else str(exc))
            self.out.clear()
            return
        if data:
            self.conn.bio_write(data)
        else:
            self.conn.bio_shutdown()

    def _write_socket(self) -> None:
        while self.out:
            try:
                del self.out[: self.sock.send(self.out)]
            except BlockingIOError:
                return
            except OSError as exc:
                self.ending = self.ending or f"write: {exc.strerror}"
                self.out.clear()


class Echo(Client):
    """Streams bytes to an application that echoes them (``cat``) and reads them back.

    ``size`` bytes from a generator seeded with ``seed`` (None: until
    ``finish``), or ``data``; both ways at once, at most ``WINDOW`` ahead;
    then close_notify, and it reads to the end.  ``intact``: what came back
    is what was sent, to the byte (length and SHA-256).
    """

    def __init__(
        self,
        ctx: SSL.Context,
        sock: socket.socket,
        *,
        size: int | None = None,
        seed: int = 0,
        data: bytes | None = None,
    ) -> None:
        super().__init__(ctx, sock)
        self.rng = random.Random(seed)
        self.data = data
        self.size = len(data) if data is not None else size
        self.sent = self.received = 0
        self.sent_hash, self.received_hash = hashlib.sha256(), hashlib.sha256()
        self.finishing = False
        self.notified = False

    def finish(self) -> None:
        """Stop sending (an endless stream); the loop must then be woken."""
        self.finishing = True

    def talk(self) -> None:
        while (self.size is None or self.sent < self.size) and not self.finishing:
            if self.sent - self.received >= WINDOW:
                break
            if self.data is not None:
                chunk = self.data[self.sent : self.sent + CHUNK]
            else:
                left = CHUNK if self.size is None else min(CHUNK, self.size - self.sent)
                chunk = self.rng.randbytes(left)
            self.conn.sendall(chunk)
            self.sent_hash.update(chunk)
            self.sent += len(chunk)
        if (self.finishing or self.sent == self.size) and not self.notified:
            self.notified = True
            self.conn.shutdown()
        while True:
            chunk = self.conn.recv(1 << 16)
            self.received_hash.update(chunk)
            self.received += len(chunk)

    @property
    def intact(self) -> bool:
        same = self.sent_hash.digest() == self.received_hash.digest()
        return self.ending == "eof" and self.sent == self.received and same


class Holder(Client):
    """Connects and waits for the application's first line (``running``), then holds on."""

    def __init__(self, ctx: SSL.Context, sock: socket.socket) -> None:
        super().__init__(ctx, sock)
        self.first = b""
        self.running = False

    @property
    def done(self) -> bool:
        return self.running or super().done

    def talk(self) -> None:
        while not self.running:
            self.first += self.conn.recv(1 << 10)
            self.running = self.first.endswith(b"\n")


class Loop:
    """Drives ``clients`` (``Client``s, or anything with the same methods) in one poll loop.

    ``run`` drives them in the caller's thread until each is ``done``;
    ``start`` does it in a thread of its own, which ``wait`` and ``join``
    watch, and which ``wake`` makes look at every client again.
    """

    def __init__(self, clients: Iterable) -> None:
        self.clients = list(clients)
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread: threading.Thread | None = None

    def run(self, timeout: float) -> None:
        """Until every client is done; AssertionError if they are not within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        epoll = select.epoll()
        fds: dict[int, int] = {}  # id(client) -> its descriptor, as registered
        by_fd: dict[int, Client] = {}

        def look(client: Client) -> None:
            fd = fds.get(id(client))
            if client.done:
                if fd is not None:
                    del fds[id(client)], by_fd[fd]
                    with contextlib.suppress(OSError):  # closed already: epoll forgot it
                        epoll.unregister(fd)
            elif fd is None:
                fds[id(client)] = client.fileno()
                by_fd[client.fileno()] = client
                epoll.register(client.fileno(), client.events())
            else:
                epoll.modify(fd, client.events())

        try:
            epoll.register(self.wake_r, select.POLLIN)
            for client in self.clients:
                client.step()
                look(client)
            while by_fd:
                left = deadline - time.monotonic()
                if left <= 0:
                    stuck = [vars_of(c) for c in list(by_fd.values())[:5]]
                    raise AssertionError(f"{len(by_fd)} clients not done in {timeout} s: {stuck}")
                for fd, revents in epoll.poll(min(left, 1.0)):
                    if fd == self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 256)
                        for client in list(by_fd.values()):
                            client.step()
                            look(client)
                    elif (client := by_fd.get(fd)) is not None:
                        client.on_event(revents)
                        look(client)
                with self.cond:
                    self.cond.notify_all()
        finally:
            epoll.close()

    def start(self, timeout: float) -> None:
        def target() -> None:
            try:
                self.run(timeout)
            except BaseException as exc:
                self.error = exc
            finally:
                with self.cond:
                    self.cond.notify_all()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Until ``predicate()`` (looked at after each round of the loop's thread)."""
        assert self.thread is not None
        with self.cond:
            ok = self.cond.wait_for(
                lambda: predicate() or self.error is not None or not self.thread.is_alive(),
                timeout,
            )
        if self.error is not None:
            raise self.error
        assert ok and predicate(), f"not within {timeout} s: {[vars_of(c) for c in self.clients]}"

    def wake(self) -> None:
        os.write(self.wake_w, b"x")

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the clients' loop did not end"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.close()


def vars_of(client: object) -> dict:
    """What a client looks like, in an assertion message."""
    keep = ("ip", "port", "ending", "sent", "received", "handshaken", "running", "sc")
    seen = {k: v for k, v in vars(client).items() if k in keep}
    inner = getattr(client, "peer", None)  # a client wrapped for the loop
    return seen if inner is None else {**seen, **vars_of(inner)}

"""The lifetime of one connection after its handshake, with no I/O.

``Lifetime`` holds everything that decides how a tunnel between an
application (cleartext, on two pipes) and a peer (TLS) moves data and how it
ends.  It never touches a descriptor, a TLS object, a process or a clock.
The loop in ``engine`` asks it which operations are wanted (``wanted()``),
performs them, and reports what each one found through one method per event;
it asks when it must be woken up (``deadline()``) and tells it the time
(``tick(now)``).  Every rule below lives here and nowhere else, and
tests/test_lifetime.py checks them without a process.

States, each with a name:

* ``Out``, our sending direction (application -> peer): ``OPEN`` (the
  application's output is read and sent), ``DRAINING`` (its output ended:
  the rest is sent), ``NOTIFYING`` (our close_notify is being written: -S, or TLS 1.3),
  ``SHUTTING`` (our write side is being shut once what TLS produced is out),
  ``ABANDONING`` (a forced close ran out of time: our write side is shut at
  once, without close_notify), ``CLOSED``.
* ``In``, the peer's direction (peer -> application): ``OPEN``, ``DRAINING``
  (the peer ended: the rest is written, then the application's input is
  closed), ``HELD`` (after an error that came once our side was over: what was
  authenticated is written and the input stays open, see below),
  ``DISCARDING`` (the application's input is closed: what the peer still
  sends is read and dropped, the lingering close), ``CLOSED``.
* ``App``: ``ABSENT`` (no application to watch), ``RUNNING``, ``TERMINATED``
  (sent SIGTERM after its grace), ``KILLED`` (sent SIGKILL), ``EXITED``.
* an error (``error``), the reason the tunnel ended (``ending``), and the
  deadlines: idle, the bound of a forced close, the linger, the grace given
  to the application, each finite once set.

Rules (s6-networking's -s/-S, -j/-J, and ours where it is silent):

* Backpressure: a side is read only when its buffer has room; each buffer is
  ``BUFSIZE`` bytes.
* Application EOF: once its output is sent, our write side is closed, with a
  close_notify first under -S, a bare half-close under -s.  The other
  direction keeps flowing.  Under TLS 1.3 the close_notify comes first under
  -s too: there it closes only its sender's direction (RFC 8446 6.1, which
  requires it before the write side is closed), and OpenSSL 3 peers take an
  EOF without one for an error.  -s keeps its meaning (a bare half-close)
  under TLS 1.2 only, where a close_notify ends both directions.
* Peer close_notify or EOF: once what it sent is written, the application's
  input is closed.  An EOF without close_notify is an error under -J (while
  the application still reads).  Under TLS 1.2 with -S a close_notify ends
  both directions at once (RFC 5246 7.2.1): the application's unsent output
  is dropped, except what OpenSSL has already started to write, which is
  finished first (OpenSSL requires it); then our close_notify goes out.  That close is bounded by
  ``LINGER`` seconds, after which our write side is shut without it, and a
  failure while it lasts (the peer hung up, a reset) is no error: the
  application's status is the result.
* Peer stops reading (EPIPE): our write side is closed, and the
  application's output with it, as on plain TCP.
* Application death: its input is closed at once; what it wrote before
  dying (what its pipe holds once it is reaped) is still sent, then our
  write side is closed as for an EOF.  Output written later by its
  background children is not carried.
* Lingering close: once both the application's input and our write side
  are closed while the peer still sends, its data is read and dropped until
  its EOF, for at most ``LINGER`` seconds and ``LINGER_BYTES`` bytes, so that
  our last records reach it before any RST.
* Idle: when no application data moved for the idle timeout, which fires
  once, both buffers are dropped, the application's pipes closed, and our
  write side closed as in a forced close (close_notify under -S or TLS 1.3, only
  if it can be written within ``LINGER``), then the linger.
* Error after the handshake (a bad record, an alert, a reset, a truncation
  under -J): the network is closed at once, and the application's output.
  What was authenticated before the error is still written to its input.
  If the error came while our side was still open, its input is then
  closed; if our side was already over (the application had ended its
  output), its input stays open, so that an application already exiting
  ends with its own status, and one still reading is never handed a clean
  EOF.  ``GRACE`` seconds after the error a living application gets SIGTERM
  (and its input is closed), ``GRACE`` seconds later SIGKILL.  The result is
  the error, except when our side was already over and the application
  exited by itself within its grace: then its status.
* Signals: a signal reported with ``signal`` is passed on to a living
  application, and the tunnel goes on (it ends when the application does).
  Once the application has exited, a signal ends the close at once.  With
  no application, a signal ends the tunnel at once, and the result is the
  wait status of a process killed by it.
* The end: once both directions and the network are closed, the tunnel
  waits for the application to exit (passing signals on); its wait status is
  the result.

Datagram mode (DTLS, ``max_datagram`` set): the application's side is one
datagram at a time and UDP has neither half-close nor FIN, so

* a side is read only when its buffer is empty: one read of the application
  (``app_datagram``) is one datagram, one record from the peer is one
  datagram for the application, and a record is never merged with the next;
* a datagram of the application larger than ``max_datagram`` (what one
  record carries at the configured MTU) is not split: it is dropped and
  counted in ``Stats.refused``;
* every close is a close_notify, and a close_notify ends the association
  both ways (DTLS 1.2 is TLS 1.2's rule): once our side is closed, what the
  peer already sent is still written, then the application's input is
  closed; nothing lingers.
"""

import copy
import signal
from enum import Enum

from .errors import TlsRuntimeError
from .sizes import BUFSIZE

LINGER = 2.0  # seconds: the bound of a lingering or forced close
LINGER_BYTES = 1 << 20  # bytes a lingering close reads and drops at most
GRACE = 2.0  # seconds an application gets after an error, then after SIGTERM


class LifetimeError(Exception):
    """An event that is impossible in the current state: a bug of the caller."""


class Out(Enum):
    """Our sending direction, application -> peer."""

    OPEN = "open"
    DRAINING = "draining"
    NOTIFYING = "close_notify pending"
    SHUTTING = "shutting"
    ABANDONING = "abandoning"
    CLOSED = "closed"


class In(Enum):
    """The peer's direction, peer -> application."""

    OPEN = "open"
    DRAINING = "draining"
    HELD = "held open"
    DISCARDING = "discarding"
    CLOSED = "closed"


class App(Enum):
    """The application."""

    ABSENT = "absent"
    RUNNING = "running"
    TERMINATED = "sent SIGTERM"
    KILLED = "sent SIGKILL"
    EXITED = "exited"


class Op(Enum):
    """An operation the loop performs when ``wanted()`` lists it."""

    __hash__ = object.__hash__  # the loop keys a dict by these: no Python-level hash

    READ_APP = "read the application's output into outbound.space()"
    SEND = "send outbound.data() to the peer"
    NOTIFY = "send close_notify"
    SHUT_WRITE = "flush what TLS produced, then shut our write side"
    ABANDON_WRITE = "shut our write side now, dropping what is not flushed"
    CLOSE_APP_OUTPUT = "close the application's output pipe"
    RECV = "receive from the peer into inbound.space()"
    WRITE_APP = "write inbound.data() to the application"
    CLOSE_APP_INPUT = "close the application's input pipe"
    CLOSE_NET = "close the network: shut for writing, then close"
    SIGNAL_APP = "send the signals of take_signals() to the application"
    WAIT_APP = "wait for the application to exit"


# The operations that move data, tried on every pass of the loop, in this order:
# the peer's first, so that what it said before a reset (its close_notify, an
# alert) is known before one of our writes reports the reset.
DATA_OPS = (Op.RECV, Op.WRITE_APP, Op.READ_APP, Op.SEND)
# The others, which only a change of state can make wanted (``control_ops``).
CONTROL_OPS = (
    Op.NOTIFY,
    Op.SHUT_WRITE,
    Op.ABANDON_WRITE,
    Op.CLOSE_APP_OUTPUT,
    Op.CLOSE_APP_INPUT,
    Op.CLOSE_NET,
    Op.SIGNAL_APP,
)


class Buffer:
    """A buffer filled at the end and drained from the start, holding memory only while used.

    ``space()`` is where the next read goes, ``data()`` what is waiting to be
    written.  The buffer is reset to its start whenever it empties, so it
    never moves bytes.  Its memory is taken when a read needs it and given
    back (``release``) once it is empty again, to a small pool the buffers of
    this process share: an idle connection holds none.
    """

    __slots__ = ("end", "size", "start", "view")

    def __init__(self, size: int = BUFSIZE) -> None:
        self.view: memoryview | None = None
        self.size = size
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def full(self) -> bool:
        """True when nothing more can be read in before some is drained."""
        return self.end == self.size

    def space(self) -> memoryview:
        """The free room at the end: the target of the next read."""
        if self.view is None:
            self.view = _take(self.size)
        return self.view[self.end :]

    def data(self) -> memoryview:
        """The bytes waiting to be written, oldest first."""
        if self.view is None:
            return _EMPTY
        return self.view[self.start : self.end]

    def produced(self, n: int) -> None:
        """Record that ``n`` bytes were read into ``space()``."""
        self.end += n

    def consumed(self, n: int) -> None:
        """Record that the first ``n`` bytes of ``data()`` were written."""
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0
            self.release()

    def truncate(self, keep: int) -> None:
        """Drop everything waiting but the first ``keep`` bytes."""
        self.end = min(self.end, self.start + keep)
        if self.start == self.end:
            self.start = self.end = 0
            self.release()

    def release(self) -> None:
        """Give the memory back if nothing is waiting (a read that found nothing calls it)."""
        if self.end == 0 and self.view is not None:
            _give(self.view)
            self.view = None


_EMPTY = memoryview(b"")
_POOL: list[memoryview] = []  # free BUFSIZE buffers of this process
POOL_MAX = 16  # buffers kept for reuse; more are freed


def _take(size: int) -> memoryview:
    if size == BUFSIZE and _POOL:
        return _POOL.pop()
    return memoryview(bytearray(size))


def _give(view: memoryview) -> None:
    if len(view) == BUFSIZE and len(_POOL) < POOL_MAX:
        _POOL.append(view)


class Stats:
    """What moved through a tunnel and how it ended, for the -v 2 info line."""

    __slots__ = ("ending", "path", "refused", "to_app", "to_peer")

    def __init__(self) -> None:
        self.to_peer = 0  # cleartext bytes the peer's TLS layer took
        self.to_app = 0  # cleartext bytes written to the application
        self.ending = ""
        self.path = "userspace"  # what carried the data: "kernel TLS ...", or why not
        self.refused = 0  # datagrams of the application too large to send (datagram mode)


class Lifetime:
    """The state and rules of one tunnel; see the module docstring.

    Args:
        close_notify: -S; implied under TLS 1.3 (see the module docstring),
            so ``self.close_notify`` says whether our end sends one.
        strict_close_notify: -J.
        tls12: the connection is TLS 1.2 (a close_notify then ends both ways).
        app: True when there is an application to watch (a pid).
        idle_timeout: seconds, or None for no limit.
        now: the clock's reading at the start (any monotonic clock).
        stats: filled with the byte counts and the ending.
        max_datagram: datagram mode (see the module docstring): the largest
            datagram of the application that is sent; it implies
            ``close_notify`` and ``tls12``.

    The loop performs each operation of ``wanted()`` and reports its outcome
    with the event method its docstring names.  An event that cannot happen
    in the current state raises ``LifetimeError`` and changes nothing.
    """

    def __init__(
        self,
        *,
        close_notify: bool = False,
        strict_close_notify: bool = False,
        tls12: bool = False,
        app: bool = True,
        idle_timeout: float | None = None,
        now: float = 0.0,
        stats: Stats | None = None,
        max_datagram: int | None = None,
    ) -> None:
        self.max_datagram = max_datagram
        self.datagram = max_datagram is not None
        self.strict_close_notify = strict_close_notify
        self.tls12 = tls12 or self.datagram
        self.close_notify = close_notify or self.datagram or not self.tls12
        # A side is read while its buffer's end is below this: anywhere in a
        # stream, only at the start (an empty buffer) in datagram mode.
        self._room = 1 if self.datagram else BUFSIZE
        self.idle_timeout = idle_timeout
        self.stats = stats if stats is not None else Stats()
        self.outbound = Buffer()
        self.inbound = Buffer()
        self.out = Out.OPEN
        self.in_ = In.OPEN
        self.app = App.RUNNING if app else App.ABSENT
        self.status: int | None = None  # the application's wait status, once it exited
        self.error: TlsRuntimeError | None = None
        # facts about descriptors the loop still has to close
        self.app_output_open = True
        self.app_input_open = True
        self.net_open = True
        # bytes of outbound.data() a TLS write took before it had to wait: it
        # must be retried with them (at least) before anything else (socket link)
        self.write_pending = 0
        self._signals: list[int] = []
        self._control: tuple[Op, ...] | None = None  # control_ops(), until the state changes
        self._our_side_over_at_error = False
        # time
        self.now = now
        self.moved = False  # application data moved since the last tick
        self.idle_at = now + idle_timeout if idle_timeout is not None else None
        self.close_by: float | None = None  # the bound of a forced close of our side
        self.linger_until: float | None = None
        self.lingered = 0  # bytes dropped while lingering
        self.grace_until: float | None = None

    # -- questions ---------------------------------------------------------

    def wanted(self) -> tuple[Op, ...]:
        """The operations useful now: ``DATA_OPS`` first, then ``CONTROL_OPS``.

        Empty only once ``finished``; ``WAIT_APP`` alone when only the
        application's exit is awaited.  Each event may change the answer, so
        a loop that performs several operations in a row checks each one
        with ``wants`` just before performing it.
        """
        ops = tuple(op for op in DATA_OPS if self.wants(op)) + self.control_ops()
        if not ops and self.app in (App.RUNNING, App.TERMINATED, App.KILLED):
            return (Op.WAIT_APP,)
        return ops

    def control_ops(self) -> tuple[Op, ...]:
        """The wanted operations of ``CONTROL_OPS``; computed once per change of state."""
        if self._control is None:
            self._control = tuple(op for op in CONTROL_OPS if self.wants(op))
        return self._control

    def wants(self, op: Op) -> bool:
        """True when ``op`` is useful now."""
        out, in_ = self.out, self.in_
        if op is _READ_APP:
            return out is _OUT_OPEN and self.outbound.end < self._room
        if op is _SEND:
            return self.outbound.end != 0 and (out is _OUT_OPEN or out is _OUT_DRAINING)
        if op is _RECV:
            return (in_ is _IN_OPEN and self.inbound.end < self._room) or in_ is _IN_DISCARDING
        if op is _WRITE_APP:
            return self.inbound.end != 0 and self.app_input_open
        if op is Op.NOTIFY:
            return out is Out.NOTIFYING
        if op is Op.SHUT_WRITE:
            return out is Out.SHUTTING
        if op is Op.ABANDON_WRITE:
            return out is Out.ABANDONING
        if op is Op.CLOSE_APP_OUTPUT:
            return self.app_output_open and out is not Out.OPEN
        if op is Op.CLOSE_APP_INPUT:
            return self.app_input_open and (in_ is In.DISCARDING or in_ is In.CLOSED)
        if op is Op.CLOSE_NET:
            return (
                self.net_open
                and out is Out.CLOSED
                and in_ is not In.OPEN
                and in_ is not In.DISCARDING
            )
        if op is Op.SIGNAL_APP:
            return bool(self._signals)
        return op is Op.WAIT_APP and self.wanted() == (Op.WAIT_APP,)

    @property
    def ending(self) -> str:
        """The first reason the tunnel started to end ("" while it has none): ``stats.ending``."""
        return self.stats.ending

    @property
    def finished(self) -> bool:
        """True when nothing is left to do: ``result()`` may be called."""
        return (
            self.out is Out.CLOSED
            and self.in_ is In.CLOSED
            and not (self.net_open or self.app_input_open or self.app_output_open)
            and (self.app is App.EXITED or self.app is App.ABSENT)
            and not self._signals
        )

    def deadline(self) -> float | None:
        """When ``tick`` must be called at the latest, or None for never."""
        best = None
        for t in (self.idle_at, self.close_by, self.linger_until, self.grace_until):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def result(self) -> int | None:
        """The application's wait status; None if there is none.

        Raises the tunnel's ``TlsRuntimeError`` if it ended with one: a copy,
        since raising the one the machine keeps would give it a traceback that
        holds this frame, and so the machine (a reference cycle per connection
        in a worker, kept until a full collection).
        """
        if not self.finished:
            raise LifetimeError("the tunnel is not over")
        if self.error is not None:
            raise copy.copy(self.error)
        return self.status

    def take_signals(self) -> list[int]:
        """The signals to send to the application now (for ``Op.SIGNAL_APP``)."""
        signals, self._signals = self._signals, []
        self._control = None
        return signals

    # -- time --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Tell the time; deadlines that passed take effect."""
        self.now = now
        if self.moved:
            self.moved = False
            if self.idle_at is not None and self.idle_timeout is not None:
                self.idle_at = now + self.idle_timeout
        idle_at, close_by = self.idle_at, self.close_by
        linger_until, grace_until = self.linger_until, self.grace_until
        if not (
            (idle_at is not None and now >= idle_at)
            or (close_by is not None and now >= close_by)
            or (linger_until is not None and now >= linger_until)
            or (grace_until is not None and now >= grace_until)
        ):
            return  # the common case, once per pass of the loop: nothing is due
        if self.idle_at is not None and now >= self.idle_at:
            self._idle()
        if self.close_by is not None and now >= self.close_by:
            self._abandon_out()
        if self.linger_until is not None and now >= self.linger_until:
            self._stop_lingering()
        if self.grace_until is not None and now >= self.grace_until:
            self._grace_over()
        self._advance()

    # -- the application's output: READ_APP -> outbound -> SEND ----------

    def app_read(self, n: int) -> None:
        """READ_APP put ``n`` > 0 bytes into ``outbound.space()``."""
        if not (self.out is _OUT_OPEN and 0 < n <= BUFSIZE - self.outbound.end):
            self._reject("app_read")
        self.outbound.produced(n)
        self.moved = True

    def app_datagram(self, n: int) -> None:
        """READ_APP (datagram mode) read one datagram of ``n`` > 0 bytes into ``outbound.space()``.

        ``n`` may exceed the space when the datagram was truncated: such a
        datagram, like any larger than ``max_datagram``, is refused.
        """
        if not (self.datagram and self.out is Out.OPEN and not self.outbound.end and n > 0):
            self._reject("app_datagram")
        assert self.max_datagram is not None
        if n > self.max_datagram:
            self.stats.refused += 1
            return
        self.outbound.produced(n)
        self.moved = True

    def app_eof(self) -> None:
        """READ_APP found the application's output at its end."""
        self._expect(self.out is Out.OPEN, "app_eof")
        self.out = Out.DRAINING
        self._advance()

    def app_read_blocked(self) -> bool:
        """READ_APP would block.  Returns True if the loop must wait for it.

        Once the application is dead, an empty pipe is the end of its output.
        """
        self._expect(self.out is Out.OPEN, "app_read_blocked")
        if self.app is App.EXITED:
            self.app_eof()
            return False
        return True

    def sent(self, n: int) -> None:
        """SEND: the TLS layer took the first ``n`` > 0 bytes of ``outbound.data()``."""
        out = self.out
        if not ((out is _OUT_OPEN or out is _OUT_DRAINING) and 0 < n <= len(self.outbound)):
            self._reject("sent")
        self.outbound.consumed(n)
        self.stats.to_peer += n
        self.moved = True
        self.write_pending = 0
        if self.close_by is not None:  # a forced close: that was the retried write
            self.outbound.truncate(0)
        if out is _OUT_DRAINING and not self.outbound.end:
            self._advance()

    def send_blocked(self) -> None:
        """SEND must wait, with records of ``outbound.data()`` started: it must be retried."""
        self._expect(self.out in (Out.OPEN, Out.DRAINING), "send_blocked")
        self.write_pending = len(self.outbound)

    def notified(self) -> None:
        """NOTIFY: our close_notify is written."""
        self._expect(self.out is Out.NOTIFYING, "notified")
        self.out = Out.SHUTTING
        self._advance()

    def shut(self) -> None:
        """SHUT_WRITE or ABANDON_WRITE: our write side is shut."""
        self._expect(self.out in (Out.SHUTTING, Out.ABANDONING), "shut")
        self.out = Out.CLOSED
        self.close_by = None
        self._advance()

    def peer_gone(self) -> None:
        """SEND, NOTIFY or SHUT_WRITE found that the peer reads nothing more (EPIPE).

        As on plain TCP: what the application still sends is lost and its
        output is closed; the peer's direction goes on.
        """
        self._expect(self.out is not Out.CLOSED, "peer_gone")
        self.out = Out.CLOSED
        self.close_by = None
        self.outbound.truncate(0)
        self.write_pending = 0
        self._advance()

    def app_output_closed(self) -> None:
        """CLOSE_APP_OUTPUT is done."""
        self._expect(self.app_output_open and self.out is not Out.OPEN, "app_output_closed")
        self.app_output_open = False
        self._control = None

    # -- the peer's data: RECV -> inbound -> WRITE_APP --------------------

    def peer_data(self, n: int) -> None:
        """RECV put ``n`` > 0 bytes into ``inbound.space()``."""
        in_ = self.in_
        if not ((in_ is _IN_OPEN or in_ is _IN_DISCARDING) and 0 < n <= BUFSIZE - self.inbound.end):
            self._reject("peer_data")
        if in_ is _IN_DISCARDING:
            self.lingered += n if self.linger_until is not None else 0
            if self.lingered >= LINGER_BYTES:
                self._stop_lingering()
                self._advance()
            return
        self.inbound.produced(n)

    def peer_closed(self, close_notify: bool) -> None:
        """RECV found the peer's end: its close_notify, or a bare EOF."""
        self._expect(self.in_ in (In.OPEN, In.DISCARDING), "peer_closed")
        if self.in_ is In.DISCARDING:  # nobody reads any more: no truncation to report
            self._stop_lingering()
        elif not close_notify and self.strict_close_notify:
            self._fail(TlsRuntimeError("peer closed the connection without close_notify"))
            return
        else:
            self._end("close_notify" if close_notify else "EOF")
            self.in_ = In.DRAINING
        if close_notify and self.tls12 and self.close_notify:
            self._force_close_out()
        self._advance()

    def peer_failed(self, reason: str) -> None:
        """RECV failed: a bad record, an alert, a reset.  ``reason``: one line."""
        self._expect(self.in_ in (In.OPEN, In.DISCARDING), "peer_failed")
        if self.in_ is In.DISCARDING and self.out is Out.CLOSED:
            # Nobody reads any more and we sent everything: only the linger ends.
            self._stop_lingering()
            self._advance()
            return
        self._fail(TlsRuntimeError(reason))

    def send_failed(self, reason: str) -> None:
        """SEND, NOTIFY or SHUT_WRITE failed other than by EPIPE.

        During a forced close (the peer's close_notify under TLS 1.2 with
        -S, or the idle timeout) our unsent output is being given up anyway:
        a failure then only ends our side, as EPIPE does.
        """
        self._expect(self.out is not Out.CLOSED, "send_failed")
        if self.close_by is not None:
            self.peer_gone()
            return
        self._fail(TlsRuntimeError(reason))

    def app_written(self, n: int) -> None:
        """WRITE_APP: the application took the first ``n`` > 0 bytes of ``inbound.data()``."""
        if not (self.app_input_open and 0 < n <= len(self.inbound)):
            self._reject("app_written")
        self.inbound.consumed(n)
        self.stats.to_app += n
        self.moved = True
        if self.in_ is not _IN_OPEN and not self.inbound.end:
            self._advance()

    def app_gone(self) -> None:
        """WRITE_APP found that the application reads nothing more (EPIPE)."""
        self._expect(self.app_input_open, "app_gone")
        self._close_app_input()
        self._advance()

    def app_input_closed(self) -> None:
        """CLOSE_APP_INPUT is done."""
        self._expect(self.app_input_open, "app_input_closed")
        self.app_input_open = False
        self._control = None

    def net_closed(self) -> None:
        """CLOSE_NET is done."""
        self._expect(self.net_open and self.out is Out.CLOSED, "net_closed")
        self.net_open = False
        self._advance()

    def loop_failed(self) -> None:
        """The loop failed on its own (an exception of ours, not the peer's).

        It closes every descriptor still open and kills a living application
        with SIGKILL at once: the tunnel is over but for the application's
        exit (``app_exited``), whose status is then the result.
        """
        if self.finished:
            return
        self._end("internal error")
        self._abandon_everything()
        self.app_output_open = self.app_input_open = self.net_open = False
        self._signals.clear()
        if self.app in (App.RUNNING, App.TERMINATED):
            self.app = App.KILLED
        self._advance()

    # -- the application's life -------------------------------------------

    def app_exited(self, status: int) -> None:
        """The application was reaped with wait status ``status``."""
        self._expect(self.app not in (App.ABSENT, App.EXITED), "app_exited")
        by_itself = self.app is App.RUNNING
        self.app = App.EXITED
        self.status = status
        self.grace_until = None
        self._signals.clear()
        if self.error is not None and self._our_side_over_at_error and by_itself:
            self.error = None  # the peer was only answering the end of our side
            self.stats.ending = "application exited"
        self._end("application exited")
        self._close_app_input()
        self._advance()

    def signal(self, sig: int) -> None:
        """A signal for the application arrived (never SIGCHLD)."""
        self._expect(not self.finished, "signal")
        if self.app in (App.RUNNING, App.TERMINATED, App.KILLED):
            self._signals.append(sig)
            self._control = None
            return
        self._end(f"signal {sig}")
        if self.app is App.ABSENT and self.status is None:
            self.status = sig  # the wait status of a process killed by it
        self._abandon_everything()
        self._advance()

    # -- internal transitions ---------------------------------------------

    def _expect(self, condition: bool, event: str) -> None:
        if not condition:
            self._reject(event)

    def _reject(self, event: str) -> None:
        raise LifetimeError(
            f"{event} is impossible now (out {self.out.value}, in {self.in_.value},"
            f" app {self.app.value})"
        )

    def _end(self, why: str) -> None:
        """Record the first reason the tunnel started to end."""
        if not self.stats.ending:
            self.stats.ending = why

    def _close_app_input(self) -> None:
        """The application's input goes: what the peer still sends is dropped."""
        self.inbound.truncate(0)
        if self.in_ is In.OPEN:
            self.in_ = In.DISCARDING
        elif self.in_ in (In.DRAINING, In.HELD):
            self.in_ = In.CLOSED

    def _force_close_out(self) -> None:
        """Close our side now, bounded by LINGER: drop the unsent output."""
        if self.out is Out.OPEN:
            self.out = Out.DRAINING
        if self.out in (Out.DRAINING, Out.NOTIFYING, Out.SHUTTING):
            if self.close_by is None:
                self.close_by = self.now + LINGER
            if self.write_pending:  # OpenSSL wants the same bytes again; sent() drops them
                self.outbound.truncate(self.write_pending)
            else:
                self.outbound.truncate(0)

    def _abandon_out(self) -> None:
        """The forced close ran out of time: shut our write side without close_notify."""
        self.close_by = None
        if self.out in (Out.DRAINING, Out.NOTIFYING, Out.SHUTTING):
            self.out = Out.ABANDONING
            self.outbound.truncate(0)
            self.write_pending = 0

    def _stop_lingering(self) -> None:
        if self.in_ is In.DISCARDING:
            self.in_ = In.CLOSED
        self.linger_until = None

    def _idle(self) -> None:
        """No application data moved for the idle timeout: close both ways, once."""
        self.idle_at = None
        self._end("idle timeout")
        self.inbound.truncate(0)
        if self.app_input_open:
            self._close_app_input()
        self._force_close_out()

    def _fail(self, error: TlsRuntimeError) -> None:
        """An error after the handshake: see the module docstring."""
        self.error = error
        self._end("error")
        self._our_side_over_at_error = self.out is Out.CLOSED
        self.out = Out.CLOSED
        self.close_by = self.idle_at = self.linger_until = None
        self.outbound.truncate(0)
        self.write_pending = 0
        if self.in_ in (In.OPEN, In.DRAINING):
            self.in_ = In.HELD if self._our_side_over_at_error else In.DRAINING
        elif self.in_ is In.DISCARDING:
            self.in_ = In.CLOSED
        if self.app in (App.RUNNING, App.TERMINATED, App.KILLED):
            self.grace_until = self.now + GRACE
        else:
            self._abandon_everything()
        self._advance()

    def _grace_over(self) -> None:
        """The application outlived its grace: SIGTERM, then SIGKILL."""
        if self.app is App.RUNNING:
            self.app = App.TERMINATED
            self._signals.append(signal.SIGTERM)
            self.grace_until = self.now + GRACE
            self._close_app_input()
        elif self.app is App.TERMINATED:
            self.app = App.KILLED
            self._signals.append(signal.SIGKILL)
            self.grace_until = None
        else:
            self.grace_until = None

    def _abandon_everything(self) -> None:
        """Stop every transfer now: drop the buffers, shut what is open."""
        self.outbound.truncate(0)
        self.inbound.truncate(0)
        self.write_pending = 0
        self.out = Out.CLOSED
        self.in_ = In.CLOSED
        self.idle_at = self.close_by = self.linger_until = self.grace_until = None

    def _advance(self) -> None:
        """The transitions that follow from the state alone; the wanted controls change."""
        self._control = None
        if self.out is Out.DRAINING and not self.outbound.end and not self.write_pending:
            self.out = Out.NOTIFYING if self.close_notify else Out.SHUTTING
        if self.datagram and self.out is Out.CLOSED:  # no half-close, no linger
            if self.in_ is In.OPEN:
                self.in_ = In.DRAINING
            elif self.in_ is In.DISCARDING:
                self.in_ = In.CLOSED
        if self.in_ is In.DRAINING and not self.inbound.end:
            self.in_ = In.CLOSED
        if self.out is Out.CLOSED and self.in_ is In.DISCARDING and self.linger_until is None:
            self.linger_until = self.now + LINGER
            self.lingered = 0
        if self.out is Out.CLOSED and self.in_ is not In.OPEN and self.in_ is not In.DISCARDING:
            self.idle_at = None


# Module-level names for the members the hot path compares against.
_RECV, _WRITE_APP, _READ_APP, _SEND = DATA_OPS
_OUT_OPEN, _OUT_DRAINING = Out.OPEN, Out.DRAINING
_IN_OPEN, _IN_DISCARDING = In.OPEN, In.DISCARDING

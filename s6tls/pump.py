"""The engine's decisions, with no I/O: buffers, what to do next, how to close.

``Pump`` is the state of one TLS tunnel between an application (cleartext) and
a peer (TLS).  It never touches a descriptor or a TLS object: the poll loop in
``engine`` performs the operations the pump asks for and reports what
happened.  So every close rule of s6tls lives here and can be tested by
feeding events in and reading decisions out.

Two directions flow independently:

* outbound: application -> ``outbound`` buffer -> TLS send to the peer;
* inbound: TLS receive from the peer -> ``inbound`` buffer -> application.

A side is read only when its buffer has room (backpressure); each buffer is
``BUFSIZE`` bytes, so at most ``BUFSIZE`` cleartext bytes per direction are
held here, plus what the TLS library holds (one record each way).

Close rules (s6-networking's -s/-S and -j/-J):

* application EOF: once ``outbound`` is empty, close our write side: with a
  close_notify first under ``close_notify`` (-S), a bare TCP half-close
  otherwise (-s).  The inbound direction keeps flowing either way.
* peer EOF: once ``inbound`` is empty, close the application's input.  A
  peer EOF without close_notify is a plain EOF, unless ``strict_close_notify``
  (-J) is set: then it is a truncation attack and ``TlsRuntimeError``.
  Under TLS 1.2 with -S, a close_notify from the peer must be answered at once
  (RFC 5246 7.2.1): what the application has not yet sent is dropped and our
  close_notify goes out.
* peer stops reading (EPIPE on send): our write side is closed and the
  application's output with it, as on a plain TCP connection; the inbound
  direction keeps flowing to the peer's EOF.
* application death: its input is closed at once; what it already wrote is
  still delivered, then our write side is closed as above.
* lingering close: once the application's input is closed, what the peer
  still sends is read and discarded until its EOF, so that the peer never
  writes into a closed connection (which would cost it, on a socket, what we
  sent last).  The loop ends the linger after a quiet ``LINGER`` seconds; a
  failure or a truncation while lingering is no error.
* idle: both directions are dropped and closed.
"""

from .errors import TlsRuntimeError

BUFSIZE = 65536
LINGER = 2.0  # seconds of silence from the peer that end a lingering close


class Buffer:
    """A fixed buffer filled at the end and drained from the start.

    ``space()`` is where the next read goes, ``data()`` what is waiting to be
    written.  The buffer is reset to its start whenever it empties, so it
    never moves bytes.
    """

    __slots__ = ("end", "size", "start", "view")

    def __init__(self, size: int = BUFSIZE) -> None:
        self.view = memoryview(bytearray(size))
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
        return self.view[self.end :]

    def data(self) -> memoryview:
        """The bytes waiting to be written, oldest first."""
        return self.view[self.start : self.end]

    def produced(self, n: int) -> None:
        """Record that ``n`` bytes were read into ``space()``."""
        self.end += n

    def consumed(self, n: int) -> None:
        """Record that the first ``n`` bytes of ``data()`` were written."""
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0

    def clear(self) -> None:
        """Drop everything waiting."""
        self.start = self.end = 0


class Stats:
    """What moved through a tunnel and how it ended, for the -v 2 info line."""

    __slots__ = ("ending", "to_app", "to_peer")

    def __init__(self) -> None:
        self.to_peer = 0  # cleartext bytes handed to TLS
        self.to_app = 0  # cleartext bytes written to the application
        self.ending = ""

    def describe_ending(self, pump: "Pump") -> None:
        """Record how ``pump`` ended: idle, application exit, close_notify or EOF."""
        if pump.idle:
            self.ending = "idle timeout"
        elif pump.app_status is not None:
            self.ending = "application exited"
        elif pump.peer_close_notify:
            self.ending = "close_notify"
        else:
            self.ending = "EOF"


class Pump:
    """The state and close rules of one tunnel; see the module docstring.

    The ``want_*`` methods say which operation is useful now; the ``on_*``
    methods record what an operation found.  ``done()`` says when the tunnel
    is finished.
    """

    def __init__(
        self, *, close_notify: bool = False, strict_close_notify: bool = False, tls12: bool = False
    ) -> None:
        self.close_notify = close_notify
        self.strict_close_notify = strict_close_notify
        self.tls12 = tls12
        self.outbound = Buffer()
        self.inbound = Buffer()
        self.app_eof = False  # no more bytes will come from the application
        self.peer_eof = False  # no more bytes will come from the peer
        self.peer_close_notify = False  # the peer's EOF was a close_notify
        self.out_closed = False  # our write side towards the peer is closed
        self.in_closed = False  # the application's input is closed
        self.app_status: int | None = None  # wait status once the application died
        self.idle = False

    # -- what to do next -------------------------------------------------

    def want_app_read(self) -> bool:
        return not self.app_eof and not self.outbound.full

    def want_peer_send(self) -> bool:
        return len(self.outbound) > 0 and not self.out_closed

    def want_out_close(self) -> bool:
        return self.app_eof and not self.outbound and not self.out_closed

    def want_peer_recv(self) -> bool:
        return not self.peer_eof and (self.in_closed or not self.inbound.full)

    def want_app_write(self) -> bool:
        return len(self.inbound) > 0 and not self.in_closed

    def want_in_close(self) -> bool:
        return self.peer_eof and not self.inbound and not self.in_closed

    def lingering(self) -> bool:
        """True when only the peer's last bytes are being read and discarded."""
        return self.out_closed and self.in_closed and not self.peer_eof

    def done(self) -> bool:
        """True when both directions are closed: the tunnel is over."""
        return self.out_closed and self.in_closed and self.peer_eof

    # -- what happened ---------------------------------------------------

    def on_peer_data(self, n: int) -> None:
        """``n`` bytes from the peer were received into ``inbound.space()``."""
        if self.in_closed:
            return  # nobody reads them any more: discarded
        self.inbound.produced(n)

    def on_app_eof(self) -> None:
        self.app_eof = True

    def on_peer_eof(self, close_notify: bool) -> None:
        """The peer will send nothing more; ``close_notify`` says how it ended.

        Raises ``TlsRuntimeError`` for an EOF without close_notify under -J.
        """
        self.peer_eof = True
        self.peer_close_notify = close_notify
        if not close_notify and self.strict_close_notify and not self.in_closed:
            raise TlsRuntimeError("peer closed the connection without close_notify")
        if close_notify and self.tls12 and self.close_notify and not self.out_closed:
            self.outbound.clear()
            self.app_eof = True

    def on_peer_gone(self) -> None:
        """The peer will read nothing more (our sends fail with EPIPE).

        As with a plain TCP connection, what the application still sends is
        lost and its output is closed (it gets EPIPE); what the peer already
        sent keeps flowing to the application until the peer's EOF.
        """
        self.app_eof = True
        self.on_out_closed()

    def on_app_gone(self) -> None:
        """The application will read nothing more (its input pipe broke)."""
        self.inbound.clear()
        self.in_closed = True

    def on_app_exit(self, status: int) -> None:
        """The application died with wait status ``status``.

        Its input is closed; its output is still read up to what it wrote
        (the loop treats a would-block on its output as EOF from now on).
        """
        self.app_status = status
        self.on_app_gone()

    def on_linger_end(self) -> None:
        """The peer was silent (or failed) while lingering: stop reading it."""
        self.peer_eof = True

    def on_idle(self) -> None:
        """No application data moved for the idle timeout: drop and close both ways."""
        self.idle = True
        self.outbound.clear()
        self.inbound.clear()
        self.app_eof = True
        self.peer_eof = True

    def on_out_closed(self) -> None:
        self.out_closed = True
        self.outbound.clear()

    def on_in_closed(self) -> None:
        self.in_closed = True

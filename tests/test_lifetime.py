"""The connection's lifetime without any I/O: events in, operations out.

A hypothesis rule-based test plays the loop, the application and the peer
against ``Lifetime`` with random sequences of events, for every -s/-S x
-j/-J x TLS 1.2/1.3, with and without an application and an idle timeout,
and checks after every step that no byte is lost, duplicated or reordered,
that something is always wanted until the end, that every deadline is
finite, and, at the end, that the result is the application's status.
Then one test per rule, named after it.
"""

import math
import os
import signal
import weakref

import pytest
from conftest import collector_off
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from s6tls.errors import TlsRuntimeError
from s6tls.lifetime import (
    GRACE,
    LINGER,
    LINGER_BYTES,
    App,
    Buffer,
    In,
    Lifetime,
    LifetimeError,
    Op,
    Out,
)
from s6tls.sizes import BUFSIZE, RECORD

SLOW = os.environ.get("S6TLS_SLOW") == "1"
STEPS = {"machines": 0, "steps": 0}  # reported by the last test of this module


SEND_OUTCOMES = ["ok", "ok", "ok", "block", "epipe", "fail"]


def fill(buf: Buffer, data: bytes) -> None:
    buf.space()[: len(data)] = data
    buf.produced(len(data))


def close_descriptors(m: Lifetime) -> None:
    """Perform the three closes the machine wants at its end."""
    m.app_output_closed()
    m.app_input_closed()
    m.net_closed()


def exited(code: int) -> int:
    """The wait status of a process that exited with ``code``."""
    return code << 8


# -- the rule-based test ------------------------------------------------------


class Tunnel(RuleBasedStateMachine):
    """The test is the loop: it performs what the machine wants, with random outcomes."""

    @initialize(
        close_notify=st.booleans(),
        strict=st.booleans(),
        tls12=st.booleans(),
        app=st.booleans(),
        idle=st.sampled_from([None, 1.0, 30.0]),
    )
    def start(self, close_notify, strict, tls12, app, idle):
        # Our end is a close_notify under -S, and under TLS 1.3 whatever -s/-S say.
        self.ends_with_close_notify = close_notify or not tls12
        self.notify_sent = False
        self.m = Lifetime(
            close_notify=close_notify,
            strict_close_notify=strict,
            tls12=tls12,
            app=app,
            idle_timeout=idle,
            now=0.0,
        )
        self.now = 0.0
        # the application's side
        self.app_wrote = bytearray()  # everything it wrote, in order
        self.app_read_pos = 0  # how much of it the engine read
        self.app_output_ended = False
        self.app_alive = app
        self.app_status: int | None = None
        self.app_got = bytearray()
        # the peer's side
        self.peer_sent = bytearray()
        self.peer_recv_pos = 0
        self.peer_end: str | None = None  # "close_notify" or "eof"
        self.peer_got = bytearray()
        # what the rules allow to be lost
        self.out_may_drop = False  # peer gone, idle, TLS 1.2 -S close, error, signal
        self.in_may_drop = False  # application gone or dead, idle, error, signal
        self.failed = False
        self.killed_by: int | None = None  # the first signal, without an application
        STEPS["machines"] += 1

    # -- helpers ---------------------------------------------------------

    def wants(self, op):
        return hasattr(self, "m") and not self.m.finished and self.m.wants(op)

    def _note_drops(self):
        m = self.m
        if m.error is not None or m.ending == "idle timeout" or self.killed_by is not None:
            self.out_may_drop = self.in_may_drop = True
        if m.error is not None:
            self.failed = True

    # -- the application ---------------------------------------------------

    @precondition(lambda self: hasattr(self, "m") and self.app_alive and not self.app_output_ended)
    @rule(data=st.binary(min_size=1, max_size=40_000))
    def app_writes(self, data):
        if len(self.app_wrote) < 400_000:
            self.app_wrote += data

    @precondition(lambda self: hasattr(self, "m") and self.app_alive and not self.app_output_ended)
    @rule()
    def app_ends_its_output(self):
        self.app_output_ended = True

    @precondition(lambda self: hasattr(self, "m") and self.app_alive)
    @rule(code=st.integers(0, 3), killed=st.booleans())
    def app_exits(self, code, killed):
        self.app_alive = False
        self.app_output_ended = True
        self.app_status = signal.SIGKILL if killed else exited(code)
        self.in_may_drop = True
        self.m.app_exited(self.app_status)
        self._note_drops()

    @precondition(lambda self: self.wants(Op.READ_APP))
    @rule(n=st.integers(1, BUFSIZE))
    def read_app(self, n):
        m = self.m
        pending = len(self.app_wrote) - self.app_read_pos
        if pending:
            k = min(n, pending, len(m.outbound.space()))
            m.outbound.space()[:k] = self.app_wrote[self.app_read_pos : self.app_read_pos + k]
            m.app_read(k)
            self.app_read_pos += k
        elif self.app_output_ended and (self.app_alive or self.m.app is App.ABSENT):
            m.app_eof()
        elif not m.app_read_blocked():
            assert m.app is App.EXITED  # a dead application's empty pipe is its EOF
        self._note_drops()

    @precondition(lambda self: self.wants(Op.WRITE_APP))
    @rule(n=st.integers(1, BUFSIZE), gone=st.booleans())
    def write_app(self, n, gone):
        m = self.m
        if gone:
            self.in_may_drop = True
            m.app_gone()
        else:
            k = min(n, len(m.inbound))
            self.app_got += m.inbound.data()[:k]
            m.app_written(k)
        self._note_drops()

    @precondition(lambda self: self.wants(Op.CLOSE_APP_OUTPUT))
    @rule()
    def close_app_output(self):
        self.m.app_output_closed()

    @precondition(lambda self: self.wants(Op.CLOSE_APP_INPUT))
    @rule()
    def close_app_input(self):
        self.m.app_input_closed()

    @precondition(lambda self: self.wants(Op.SIGNAL_APP))
    @rule(dies=st.booleans())
    def signal_app(self, dies):
        signals = self.m.take_signals()
        assert signals and signal.SIGCHLD not in signals
        if dies and self.app_alive:
            self.app_alive = False
            self.app_output_ended = True
            self.app_status = signals[-1]
            self.in_may_drop = True
            self.m.app_exited(self.app_status)
        self._note_drops()

    @precondition(lambda self: hasattr(self, "m") and not self.m.finished)
    @rule(sig=st.sampled_from([signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]))
    def a_signal_arrives(self, sig):
        if self.m.app is App.ABSENT and self.killed_by is None:
            self.killed_by = sig
        if self.m.app in (App.ABSENT, App.EXITED):  # the end, at once
            self.out_may_drop = self.in_may_drop = True
        self.m.signal(sig)
        self._note_drops()

    # -- the peer ----------------------------------------------------------

    @precondition(lambda self: hasattr(self, "m") and self.peer_end is None)
    @rule(data=st.binary(min_size=1, max_size=40_000))
    def peer_writes(self, data):
        if len(self.peer_sent) < 400_000:
            self.peer_sent += data

    @precondition(lambda self: hasattr(self, "m") and self.peer_end is None)
    @rule(close_notify=st.booleans())
    def peer_ends(self, close_notify):
        self.peer_end = "close_notify" if close_notify else "eof"

    @precondition(lambda self: self.wants(Op.RECV))
    @rule(n=st.integers(1, RECORD), fail=st.booleans())
    def recv(self, n, fail):
        m = self.m
        pending = len(self.peer_sent) - self.peer_recv_pos
        if fail and pending == 0:
            m.peer_failed("TLS error: bad record mac")
        elif pending:
            k = min(n, pending, len(m.inbound.space()))
            m.inbound.space()[:k] = self.peer_sent[self.peer_recv_pos : self.peer_recv_pos + k]
            m.peer_data(k)
            self.peer_recv_pos += k
        elif self.peer_end is not None:
            m.peer_closed(self.peer_end == "close_notify")
            if self.peer_end == "close_notify" and m.tls12 and m.close_notify:
                self.out_may_drop = True
        self._note_drops()

    @precondition(lambda self: self.wants(Op.SEND))
    @rule(
        n=st.integers(1, BUFSIZE),
        outcome=st.sampled_from(["ok", "ok", "ok", "block", "epipe", "fail"]),
    )
    def send(self, n, outcome):
        m = self.m
        if outcome == "ok":
            k = min(n, len(m.outbound))
            if m.write_pending:
                k = len(m.outbound)  # OpenSSL finishes the record it started
            self.peer_got += m.outbound.data()[:k]
            m.sent(k)
        elif outcome == "block":
            m.send_blocked()
        elif outcome == "epipe":
            self.out_may_drop = True
            m.peer_gone()
        else:
            self.out_may_drop = True  # an error, or during a forced close the end of our side
            m.send_failed("connection broken: Connection reset by peer")
        self._note_drops()

    @precondition(lambda self: self.wants(Op.NOTIFY))
    @rule(outcome=st.sampled_from(["ok", "epipe", "fail"]))
    def notify(self, outcome):
        if outcome == "ok":
            self.notify_sent = True
            self.m.notified()
        elif outcome == "epipe":
            self.m.peer_gone()
        else:
            self.out_may_drop = True
            self.m.send_failed("TLS error: x")
        self._note_drops()

    @precondition(lambda self: self.wants(Op.SHUT_WRITE) or self.wants(Op.ABANDON_WRITE))
    @rule()
    def shut(self):
        self._shut()

    def _shut(self):
        """SHUT_WRITE follows our close_notify exactly when our end is one (ABANDON_WRITE never)."""
        if self.m.wants(Op.SHUT_WRITE):
            assert self.notify_sent == self.ends_with_close_notify
        self.m.shut()

    @precondition(lambda self: self.wants(Op.CLOSE_NET))
    @rule()
    def close_net(self):
        self.m.net_closed()

    # -- time --------------------------------------------------------------

    @precondition(lambda self: hasattr(self, "m"))
    @rule(dt=st.sampled_from([0.001, 0.5, 1.0, 2.5]))
    def time_passes(self, dt):
        self.now += dt
        if self.m.idle_at is not None and self.now >= self.m.idle_at:
            self.out_may_drop = self.in_may_drop = True  # the idle timeout fires
        self.m.tick(self.now)
        self._note_drops()

    # -- what must hold after every step -------------------------------------

    @invariant()
    def no_byte_is_lost_duplicated_or_reordered(self):
        if not hasattr(self, "m"):
            return
        STEPS["steps"] += 1
        assert bytes(self.app_wrote).startswith(bytes(self.peer_got))
        assert bytes(self.peer_sent).startswith(bytes(self.app_got))

    @invariant()
    def something_is_wanted_until_the_end(self):
        if not hasattr(self, "m"):
            return
        m = self.m
        if m.finished:
            assert m.wanted() == ()
        else:
            assert m.wanted(), (m.out, m.in_, m.app)

    @invariant()
    def every_deadline_is_finite_and_ahead_of_a_tick(self):
        if not hasattr(self, "m"):
            return
        d = self.m.deadline()
        assert d is None or math.isfinite(d)

    def teardown(self):
        if not hasattr(self, "m"):
            return
        self._drive_to_the_end()
        m = self.m
        assert m.finished
        if m.error is not None:
            with pytest.raises(TlsRuntimeError):
                m.result()
            return
        result = m.result()
        if self.app_status is not None:
            assert result == self.app_status  # the application's status, always
        elif self.killed_by is not None:
            assert result == self.killed_by
        else:
            assert result is None
        # a clean end delivers everything both ways
        if not self.out_may_drop:  # a dead application's last output included
            assert bytes(self.peer_got) == bytes(self.app_wrote)
        if not self.in_may_drop and not self.failed and self.peer_end is not None:
            assert bytes(self.app_got) == bytes(self.peer_sent)

    def _drive_to_the_end(self):
        """A polite world: everyone finishes; the machine must end within bounds."""
        m = self.m
        self.peer_end = self.peer_end or "close_notify"
        for _step in range(10_000):
            if m.finished:
                return
            progressed = False
            for op in m.wanted():
                if m.finished or not m.wants(op):
                    continue
                progressed = True
                if op is Op.READ_APP:
                    if self.app_alive or m.app is App.ABSENT:
                        self.app_output_ended = True
                    self.read_app(BUFSIZE)
                elif op is Op.SEND:
                    k = len(m.outbound)
                    self.peer_got += m.outbound.data()[:k]
                    m.sent(k)
                elif op is Op.NOTIFY:
                    self.notify(outcome="ok")
                elif op in (Op.SHUT_WRITE, Op.ABANDON_WRITE):
                    self._shut()
                elif op is Op.CLOSE_APP_OUTPUT:
                    m.app_output_closed()
                elif op is Op.RECV:
                    self.recv(RECORD, False)
                elif op is Op.WRITE_APP:
                    self.write_app(BUFSIZE, False)
                elif op is Op.CLOSE_APP_INPUT:
                    m.app_input_closed()
                elif op is Op.CLOSE_NET:
                    m.net_closed()
                elif op is Op.SIGNAL_APP:
                    self.signal_app(True)
                elif op is Op.WAIT_APP:
                    progressed = False
            if not progressed:
                if self.app_alive:  # the application exits once its pipes are closed
                    self.app_exits(0, False)
                else:
                    deadline = m.deadline()
                    assert deadline is not None, ("stuck", m.out, m.in_, m.app, m.wanted())
                    self.now = max(self.now, deadline)
                    m.tick(self.now)
        raise AssertionError(f"no end: out {m.out}, in {m.in_}, app {m.app}")


Tunnel.TestCase.settings = settings(
    max_examples=5000 if SLOW else 600,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_random_event_sequences_keep_every_rule = Tunnel.TestCase


# -- one test per rule -------------------------------------------------------


def written(m: Lifetime, data: bytes) -> None:
    """READ_APP: the application wrote ``data``, which goes to the machine's buffer."""
    m.outbound.space()[: len(data)] = data
    m.app_read(len(data))


def end_our_side(m: Lifetime) -> None:
    """NOTIFY if the machine wants it (-S, TLS 1.3), then SHUT_WRITE."""
    if m.wants(Op.NOTIFY):
        m.notified()
    m.shut()


def test_a_full_side_is_not_read_backpressure():
    m = Lifetime()
    fill(m.outbound, bytes(BUFSIZE))
    assert not m.wants(Op.READ_APP) and m.wants(Op.SEND)
    fill(m.inbound, bytes(BUFSIZE))
    assert not m.wants(Op.RECV) and m.wants(Op.WRITE_APP)


def test_application_eof_closes_our_side_once_its_data_is_sent_then_the_other_way_flows():
    m = Lifetime(tls12=True)  # -s under TLS 1.2: a bare half-close
    written(m, b"last words")
    m.app_eof()
    assert m.out is Out.DRAINING and m.wants(Op.SEND) and not m.wants(Op.SHUT_WRITE)
    m.sent(10)
    assert m.out is Out.SHUTTING and m.wants(Op.CLOSE_APP_OUTPUT)
    m.shut()
    assert m.out is Out.CLOSED and m.wants(Op.RECV) and not m.finished


@pytest.mark.parametrize(("close_notify", "tls12"), [(True, True), (True, False), (False, False)])
def test_S_and_any_tls13_end_send_close_notify_before_the_half_close(close_notify, tls12):
    """RFC 8446 6.1: under TLS 1.3 a close_notify closes one direction, and must come first."""
    m = Lifetime(close_notify=close_notify, tls12=tls12)
    written(m, b"last words")
    m.app_eof()
    m.sent(10)
    assert m.wants(Op.NOTIFY) and not m.wants(Op.SHUT_WRITE)
    m.notified()
    assert m.wants(Op.SHUT_WRITE) and m.wants(Op.RECV)  # the peer's direction goes on
    m.shut()
    assert m.out is Out.CLOSED and m.wants(Op.RECV) and not m.wants(Op.CLOSE_NET)


def test_peer_eof_reaches_the_application_after_its_data():
    m = Lifetime()
    m.inbound.space()[:4] = b"tail"
    m.peer_data(4)
    m.peer_closed(close_notify=True)
    assert m.in_ is In.DRAINING and not m.wants(Op.RECV) and not m.wants(Op.CLOSE_APP_INPUT)
    m.app_written(4)
    assert m.in_ is In.CLOSED and m.wants(Op.CLOSE_APP_INPUT)


@pytest.mark.parametrize("strict", [False, True])
def test_eof_without_close_notify_is_an_error_only_under_J(strict):
    m = Lifetime(strict_close_notify=strict)
    m.peer_closed(close_notify=False)
    assert (m.error is not None) == strict
    if strict:
        assert str(m.error) == "peer closed the connection without close_notify"


def test_tls13_close_notify_under_S_keeps_our_direction_open():
    m = Lifetime(close_notify=True, tls12=False)
    written(m, b"going")
    m.peer_closed(close_notify=True)
    assert m.out is Out.OPEN and m.wants(Op.SEND) and m.wants(Op.READ_APP)


def test_tls12_close_notify_under_S_finishes_a_started_write_then_answers():
    """Case 2 of the lifetime issue: no 98, the application's status."""
    m = Lifetime(close_notify=True, tls12=True)
    written(m, bytes(3 * RECORD))
    m.send_blocked()  # OpenSSL started on these 48 KiB and must be given them again
    written(m, bytes(100))  # more came from the application meanwhile
    m.peer_closed(close_notify=True)
    assert m.out is Out.DRAINING and len(m.outbound) == 3 * RECORD  # the started write stays
    assert m.wants(Op.SEND) and not m.wants(Op.NOTIFY) and not m.wants(Op.READ_APP)
    m.sent(RECORD)  # it finished one record: the rest is given up
    assert m.out is Out.NOTIFYING and len(m.outbound) == 0
    m.notified()
    m.shut()
    close_descriptors(m)
    m.app_exited(exited(3))
    assert m.finished and m.result() == exited(3)


def test_a_failure_during_the_tls12_close_is_no_error():
    m = Lifetime(close_notify=True, tls12=True)
    written(m, bytes(100))
    m.send_blocked()
    m.peer_closed(close_notify=True)
    m.send_failed("connection broken: Connection reset by peer")  # it hung up
    assert m.error is None and m.out is Out.CLOSED
    m.app_exited(exited(3))
    close_descriptors(m)
    assert m.result() == exited(3)


def test_tls12_close_is_bounded_then_abandoned_without_close_notify():
    m = Lifetime(close_notify=True, tls12=True)
    written(m, bytes(100))
    m.send_blocked()
    m.peer_closed(close_notify=True)
    assert m.deadline() == LINGER
    m.tick(LINGER)
    assert m.out is Out.ABANDONING and m.wants(Op.ABANDON_WRITE) and not m.wants(Op.SEND)


def test_a_peer_that_stopped_reading_closes_our_side_and_drops_what_is_left():
    m = Lifetime()
    written(m, b"lost")
    m.peer_gone()
    assert m.out is Out.CLOSED and len(m.outbound) == 0
    assert m.wants(Op.CLOSE_APP_OUTPUT) and m.wants(Op.RECV) and not m.wants(Op.CLOSE_NET)


def test_a_dead_application_output_is_still_sent_then_the_peer_is_drained_with_a_bound():
    """Case 3: an endless peer cannot keep the tunnel alive after the application died."""
    m = Lifetime(strict_close_notify=True)
    written(m, b"its last bytes")
    m.inbound.space()[:6] = b"unread"
    m.peer_data(6)
    m.app_exited(exited(7))
    assert m.in_ is In.DISCARDING and len(m.inbound) == 0 and m.wants(Op.CLOSE_APP_INPUT)
    assert m.wants(Op.SEND)
    assert not m.app_read_blocked()  # its empty pipe is its EOF now
    m.sent(14)
    end_our_side(m)
    assert m.deadline() == LINGER  # the linger started with our write side shut
    now = 0.0
    while m.in_ is In.DISCARDING:  # a peer that sends 1 KB every 10 ms, for ever
        m.peer_data(1024)
        now += 0.01
        m.tick(now)
    assert now <= LINGER + 0.02
    close_descriptors(m)
    assert m.finished and m.result() == exited(7)


def test_a_lingering_close_stops_after_its_byte_bound():
    m = Lifetime()
    m.app_exited(exited(0))
    m.app_read_blocked()
    end_our_side(m)
    for _ in range(LINGER_BYTES // RECORD):
        assert m.in_ is In.DISCARDING
        m.peer_data(RECORD)
    assert m.in_ is In.CLOSED and m.deadline() is None


def test_no_error_while_lingering():
    m = Lifetime(strict_close_notify=True)
    m.app_exited(exited(0))
    m.app_read_blocked()
    end_our_side(m)
    m.peer_failed("connection broken: Connection reset by peer")
    assert m.error is None and m.in_ is In.CLOSED


def test_the_idle_timeout_fires_once_and_its_close_is_bounded():
    """Case 1: a peer that stopped reading, with an idle timeout: no busy loop, an end."""
    m = Lifetime(close_notify=True, idle_timeout=1.0)
    written(m, bytes(BUFSIZE))
    m.send_blocked()  # the peer reads nothing
    m.tick(0.0)
    assert m.deadline() == 1.0
    m.tick(1.0)
    assert m.ending == "idle timeout" and m.idle_at is None
    assert m.deadline() == 1.0 + LINGER  # moved on: the next wake-up is not now
    assert m.wants(Op.CLOSE_APP_OUTPUT) and m.wants(Op.CLOSE_APP_INPUT)
    m.tick(1.0 + LINGER)
    assert m.out is Out.ABANDONING  # close_notify skipped: it could not be written
    m.shut()
    m.app_output_closed()
    m.app_input_closed()
    m.tick(1.0 + 2 * LINGER)  # the peer never sends EOF either
    m.net_closed()
    assert m.wanted() == (Op.WAIT_APP,) and m.deadline() is None
    m.app_exited(exited(0))
    assert m.finished and m.result() == exited(0)


def test_activity_moves_the_idle_deadline():
    m = Lifetime(idle_timeout=1.0)
    written(m, b"x")
    m.tick(0.9)
    assert m.deadline() == pytest.approx(1.9)


def test_an_error_closes_the_pipes_then_sigterm_then_sigkill_and_waits():
    """Case 4: the application is gone before the error is reported."""
    m = Lifetime()
    m.peer_failed("TLS error: bad record mac")
    assert m.out is Out.CLOSED and m.in_ is In.CLOSED
    assert m.wants(Op.CLOSE_APP_OUTPUT) and m.wants(Op.CLOSE_APP_INPUT) and m.wants(Op.CLOSE_NET)
    assert m.deadline() == GRACE
    close_descriptors(m)
    m.tick(GRACE)
    assert m.take_signals() == [signal.SIGTERM] and m.app is App.TERMINATED
    m.tick(2 * GRACE)
    assert m.take_signals() == [signal.SIGKILL] and m.deadline() is None
    assert not m.finished and m.wanted() == (Op.WAIT_APP,)
    m.app_exited(signal.SIGKILL)
    with pytest.raises(TlsRuntimeError, match="bad record mac"):
        m.result()


def test_a_machine_that_raised_its_error_is_freed_once_dropped():
    """A worker runs many tunnels in one process: once ``result`` raised a tunnel's
    error, dropping the machine frees it at once.  (Raising the very exception the
    machine keeps gave it a traceback holding ``result``'s frame, so the machine:
    a cycle per failed connection, kept until a full collection.)"""
    m = Lifetime()
    m.peer_failed("TLS error: bad record mac")
    close_descriptors(m)
    m.app_exited(exited(0))
    with pytest.raises(TlsRuntimeError, match="bad record mac"):
        m.result()
    gone = weakref.ref(m)
    with collector_off():
        del m
        assert gone() is None  # freed by its last reference: no cycle


def test_authenticated_data_still_reaches_the_application_after_an_error():
    """Case 6: nothing blocks; what was received before the error is written."""
    m = Lifetime()
    m.inbound.space()[:5] = b"valid"
    m.peer_data(5)
    m.peer_failed("TLS error: bad record mac")
    assert m.wants(Op.WRITE_APP) and not m.wants(Op.CLOSE_APP_INPUT)
    m.app_written(5)
    assert m.wants(Op.CLOSE_APP_INPUT)


def test_an_error_after_our_end_is_the_end_if_the_application_exits_by_itself():
    m = Lifetime(tls12=True)
    m.app_eof()
    end_our_side(m)
    m.peer_failed("TLS error: decode error")  # a peer answering our bare EOF
    assert m.in_ is In.HELD and not m.wants(Op.CLOSE_APP_INPUT)  # no clean EOF handed over
    m.app_exited(exited(0))
    close_descriptors(m)
    assert m.result() == exited(0)


def test_an_error_after_our_end_still_stands_when_the_application_had_to_be_killed():
    m = Lifetime()
    m.app_eof()
    end_our_side(m)
    m.peer_failed("TLS error: bad record mac")
    m.tick(GRACE)
    assert m.take_signals() == [signal.SIGTERM] and m.wants(Op.CLOSE_APP_INPUT)
    m.app_exited(signal.SIGTERM)
    close_descriptors(m)
    with pytest.raises(TlsRuntimeError):
        m.result()


def test_signals_are_passed_on_and_the_status_is_the_applications():
    """Case 5."""
    m = Lifetime()
    m.signal(signal.SIGTERM)
    m.signal(signal.SIGINT)
    assert m.wants(Op.SIGNAL_APP) and m.take_signals() == [signal.SIGTERM, signal.SIGINT]
    m.app_exited(signal.SIGTERM)
    assert m.app is App.EXITED and m.in_ is In.DISCARDING


def test_a_signal_after_the_application_died_ends_the_close_at_once():
    m = Lifetime()
    m.app_exited(exited(5))
    m.signal(signal.SIGTERM)
    close_descriptors(m)
    assert m.finished and m.result() == exited(5)


def test_without_an_application_a_signal_ends_the_tunnel_as_if_it_killed_it():
    m = Lifetime(app=False)
    m.signal(signal.SIGTERM)
    close_descriptors(m)
    assert m.finished and m.result() == signal.SIGTERM


def test_the_network_is_closed_only_once_both_directions_are_done():
    """Case 7's half in the machine: CLOSE_NET (shut for writing, then close) comes last."""
    m = Lifetime()
    m.app_eof()
    end_our_side(m)
    assert not m.wants(Op.CLOSE_NET)  # the peer may still send
    m.peer_closed(close_notify=True)
    assert m.wants(Op.CLOSE_NET)


def test_impossible_events_are_rejected_not_ignored():
    m = Lifetime(tls12=True)
    with pytest.raises(LifetimeError):
        m.sent(1)  # nothing to send
    m.app_eof()
    with pytest.raises(LifetimeError):
        m.app_read(1)  # its output ended
    with pytest.raises(LifetimeError):
        m.notified()  # no close_notify was wanted under -s with TLS 1.2
    m2 = Lifetime(app=False)
    with pytest.raises(LifetimeError):
        m2.app_exited(0)
    with pytest.raises(LifetimeError):
        m2.result()


# -- datagram mode (DTLS) ------------------------------------------------------


def datagram(m: Lifetime, data: bytes) -> None:
    """READ_APP in datagram mode: one message of the application."""
    m.outbound.space()[: len(data)] = data[: len(m.outbound.space())]
    m.app_datagram(len(data))


def test_datagram_mode_reads_a_side_only_when_its_buffer_is_empty():
    m = Lifetime(max_datagram=1000)
    datagram(m, b"one")
    assert not m.wants(Op.READ_APP) and m.wants(Op.SEND)
    m.sent(3)
    assert m.wants(Op.READ_APP)
    m.peer_data(5)
    assert not m.wants(Op.RECV) and m.wants(Op.WRITE_APP)
    m.app_written(5)
    assert m.wants(Op.RECV)


def test_stream_mode_reads_a_side_as_long_as_its_buffer_has_room():
    """The twin: without max_datagram, a second read joins the first."""
    m = Lifetime()
    fill(m.outbound, b"one")
    m.app_read(3)
    assert m.wants(Op.READ_APP)


def test_a_datagram_larger_than_one_record_is_refused_and_counted_not_split():
    m = Lifetime(max_datagram=4)
    datagram(m, b"12345")
    assert not m.outbound and m.stats.refused == 1 and m.wants(Op.READ_APP)
    datagram(m, b"1234")
    assert bytes(m.outbound.data()) == b"1234" and m.stats.refused == 1


def test_datagram_mode_ends_with_close_notify_and_both_ways_without_lingering():
    m = Lifetime(max_datagram=1000)  # neither -S nor TLS 1.2 asked: implied
    m.peer_data(3)  # the peer sent this before our side closed: still delivered
    m.app_eof()
    assert m.wants(Op.NOTIFY)
    m.notified()
    m.shut()
    assert m.out is Out.CLOSED and m.in_ is In.DRAINING and not m.wants(Op.RECV)
    m.app_written(3)
    assert m.wants(Op.CLOSE_APP_INPUT) and m.wants(Op.CLOSE_NET)
    assert m.linger_until is None


def test_datagram_mode_a_peer_close_notify_ends_our_side_too():
    m = Lifetime(max_datagram=1000)
    datagram(m, b"unsent")
    m.peer_closed(close_notify=True)
    assert not m.outbound and m.wants(Op.NOTIFY) and m.close_by is not None


def test_datagram_mode_a_dead_application_is_not_followed_by_a_linger():
    m = Lifetime(max_datagram=1000)
    m.app_exited(0)
    assert m.in_ is In.DISCARDING
    m.app_eof()
    m.notified()
    m.shut()
    assert m.in_ is In.CLOSED and m.linger_until is None and m.wants(Op.CLOSE_NET)


@settings(max_examples=300 if not SLOW else 3000, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=60), max_size=30),
    records=st.lists(st.integers(min_value=1, max_value=60), max_size=30),
    order=st.randoms(use_true_random=False),
)
def test_datagram_boundaries_survive_any_order_of_operations(sizes, records, order):
    """Each datagram of the application is sent alone, or refused; each record is written alone."""
    limit = 40
    m = Lifetime(max_datagram=limit)
    to_read = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    to_recv = [bytes([i % 251]) * n for i, n in enumerate(records)]
    sent, written = [], []
    for _step in range(1000):
        ops = [op for op in (Op.READ_APP, Op.SEND, Op.RECV, Op.WRITE_APP) if m.wants(op)]
        ops = [op for op in ops if op not in (Op.READ_APP,) or to_read]
        ops = [op for op in ops if op is not Op.RECV or to_recv]
        if not ops:
            break
        op = order.choice(ops)
        if op is Op.READ_APP:
            datagram(m, to_read.pop(0))
        elif op is Op.SEND:
            sent.append(bytes(m.outbound.data()))
            m.sent(len(m.outbound))
        elif op is Op.RECV:
            record = to_recv.pop(0)
            m.inbound.space()[: len(record)] = record
            m.peer_data(len(record))
        else:
            written.append(bytes(m.inbound.data()))
            m.app_written(len(m.inbound))
    expected = [bytes([i % 251]) * n for i, n in enumerate(sizes) if n <= limit]
    assert sent == expected
    assert m.stats.refused == len(sizes) - len(expected)
    assert written == [bytes([i % 251]) * n for i, n in enumerate(records)]


def test_the_stateful_run_took_many_steps():
    """Reported in the test log (-s): how much the rule-based test ran."""
    print(f"rule-based test: {STEPS['machines']} machines, {STEPS['steps']} steps")
    assert STEPS["steps"] > STEPS["machines"] > 0

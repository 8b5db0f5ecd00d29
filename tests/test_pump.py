"""The engine's close rules without any I/O: events in, decisions out."""

import pytest

from s6tls.errors import TlsRuntimeError
from s6tls.pump import BUFSIZE, Buffer, Pump, Stats


def fill(buf: Buffer, data: bytes) -> None:
    """Simulate a read of ``data`` into ``buf``."""
    buf.space()[: len(data)] = data
    buf.produced(len(data))


def test_a_buffer_drains_in_order_and_rewinds_when_empty():
    buf = Buffer(8)
    fill(buf, b"abcde")
    assert bytes(buf.data()) == b"abcde" and len(buf.space()) == 3
    buf.consumed(2)
    assert bytes(buf.data()) == b"cde"
    fill(buf, b"fgh")
    assert buf.full and bytes(buf.data()) == b"cdefgh"
    buf.consumed(6)
    assert len(buf) == 0 and len(buf.space()) == 8 and not buf.full


def test_a_full_side_is_not_read_backpressure():
    pump = Pump()
    fill(pump.outbound, bytes(BUFSIZE))
    assert not pump.want_app_read() and pump.want_peer_send()
    pump.on_peer_data(0)  # nothing came from the peer: the other direction is untouched
    assert pump.want_peer_recv()
    fill(pump.inbound, bytes(BUFSIZE))
    assert not pump.want_peer_recv() and pump.want_app_write()


def test_application_eof_closes_our_side_only_once_its_data_is_sent():
    pump = Pump()
    fill(pump.outbound, b"last words")
    pump.on_app_eof()
    assert not pump.want_out_close() and pump.want_peer_send()
    pump.outbound.consumed(10)
    assert pump.want_out_close()
    pump.on_out_closed()
    assert not pump.done() and pump.want_peer_recv()  # -s: the other way still flows


def test_peer_eof_reaches_the_application_after_its_data():
    pump = Pump()
    pump.on_peer_data(0)
    fill(pump.inbound, b"tail")
    pump.on_peer_eof(close_notify=True)
    assert not pump.want_in_close() and not pump.want_peer_recv()
    pump.inbound.consumed(4)
    assert pump.want_in_close()
    pump.on_in_closed()
    pump.on_app_eof()
    pump.on_out_closed()
    assert pump.done()


@pytest.mark.parametrize("strict", [False, True])
def test_eof_without_close_notify_is_an_error_only_under_J(strict):
    pump = Pump(strict_close_notify=strict)
    if strict:
        with pytest.raises(TlsRuntimeError, match="without close_notify"):
            pump.on_peer_eof(close_notify=False)
    else:
        pump.on_peer_eof(close_notify=False)
        assert pump.want_in_close()


def test_tls12_close_notify_under_S_ends_both_directions_at_once():
    pump = Pump(close_notify=True, tls12=True)
    fill(pump.outbound, b"never sent")
    pump.on_peer_eof(close_notify=True)
    assert pump.app_eof and len(pump.outbound) == 0 and pump.want_out_close()


def test_tls13_close_notify_under_S_keeps_our_direction_open():
    pump = Pump(close_notify=True, tls12=False)
    fill(pump.outbound, b"still going")
    pump.on_peer_eof(close_notify=True)
    assert not pump.app_eof and pump.want_peer_send()


def test_a_dead_application_output_is_still_sent_then_the_peer_is_drained():
    pump = Pump(strict_close_notify=True)
    fill(pump.outbound, b"its last bytes")
    fill(pump.inbound, b"unread")
    pump.on_app_exit(7 << 8)
    assert pump.in_closed and len(pump.inbound) == 0
    assert pump.want_peer_send() and pump.want_peer_recv()
    pump.outbound.consumed(14)
    pump.on_app_eof()
    pump.on_out_closed()
    assert pump.lingering() and not pump.done()
    pump.on_peer_data(BUFSIZE)  # discarded: the room stays whole
    assert len(pump.inbound.space()) == BUFSIZE
    pump.on_peer_eof(close_notify=False)  # no truncation error: nobody reads any more
    assert pump.done()
    stats = Stats()
    stats.describe_ending(pump)
    assert stats.ending == "application exited"


def test_a_silent_peer_ends_the_linger():
    pump = Pump()
    pump.on_app_gone()
    pump.on_app_eof()
    pump.on_out_closed()
    assert pump.lingering()
    pump.on_linger_end()
    assert pump.done()


def test_a_peer_that_stopped_reading_closes_our_side_and_drops_what_is_left():
    pump = Pump()
    fill(pump.outbound, b"lost, as on TCP")
    pump.on_peer_gone()
    assert pump.out_closed and pump.app_eof and len(pump.outbound) == 0
    assert not pump.want_app_read() and pump.want_peer_recv()


def test_idle_drops_both_directions():
    pump = Pump()
    fill(pump.outbound, b"x")
    fill(pump.inbound, b"y")
    pump.on_idle()
    assert pump.want_out_close() and pump.want_in_close() and not pump.want_peer_recv()
    stats = Stats()
    stats.describe_ending(pump)
    assert stats.ending == "idle timeout"

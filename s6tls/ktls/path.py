"""The kernel TLS data path: the connection's records run by Linux, data spliced.

``take_over`` hands a connection whose handshake is done to the kernel
(``keys`` for the keys, ``sockopts`` for the socket) or says why it
cannot, in which case nothing changed and the connection goes on in
userspace.  The ``KernelPath`` it returns moves data between the
application's pipes and the socket with ``splice`` (the cleartext never
enters Python) and offers the engine the same closing operations as a
``link.Link``: ``notify``, ``shut_write``, ``abandon_write``, ``close``.

Non-data records the peer sends are read whole and acted on here, as
OpenSSL would: a session ticket is dropped; a TLS 1.2 renegotiation request
gets a no_renegotiation warning; a KeyUpdate is followed where the kernel
can change keys, otherwise it is an error; a fatal alert is an error; an
unexpected record is an error answered with an alert.  Errors raise
``TlsRuntimeError`` with one line for the -v line and stderr.
"""

import contextlib
import select

from OpenSSL import SSL

from ..errors import TlsRuntimeError
from ..link import Link, PeerGone, WouldBlock, poll_now
from .keys import HandshakeWatch, KeysUnavailable, connection_keys
from .sockopts import (
    APPLICATION_DATA,
    BAD_RECORD_MAC,
    CLOSE_NOTIFY,
    FATAL,
    MAX_RECORD,
    WARNING,
    HalfInstalled,
    KernelTls,
    Unavailable,
    tcp_socket,
)

SPLICE = 65536  # bytes one splice moves at most: a pipe's default capacity
PEER_CLOSE_NOTIFY = -1  # move_in: the peer's close_notify (the only negative answer)
_DRAIN = 64  # records read and dropped at most when the socket is closed

__all__ = ["PEER_CLOSE_NOTIFY", "HalfInstalled", "KernelPath", "take_over"]


def take_over(
    conn: SSL.Connection,
    rfd: int,
    wfd: int,
    watch: HandshakeWatch | None,
    base: Link | None = None,
) -> "KernelPath | str":
    """Give ``conn``'s record layer to the kernel, on the TCP socket ``rfd`` = ``wfd``.

    ``conn``'s handshake is done and nothing was sent or received through it
    since; ``watch`` saw that handshake (None: nobody watched it).  ``base`` is the link the path
    replaces, closed with it.  Returns the ``KernelPath``, or the reason
    kernel TLS cannot take the connection (nothing was changed: it goes on
    in userspace).  Raises ``HalfInstalled`` (98) when the kernel took one
    direction only.
    """
    reason = tcp_socket(rfd, wfd)
    if reason is not None:
        return reason
    if conn.pending():
        return "OpenSSL already holds received data"
    try:
        keys = connection_keys(conn, watch)
        ktls = KernelTls.install(rfd, keys)
    except (KeysUnavailable, Unavailable) as exc:
        return str(exc)
    return KernelPath(ktls, f"{conn.get_protocol_version_name()} {keys.suite.name}", base)


class KernelPath:
    """A connection whose records the kernel runs; see the module docstring.

    Owns the ``KernelTls`` (a duplicate of the socket) and ``base``, the link
    it replaces: ``close`` releases both.
    """

    def __init__(self, ktls: KernelTls, describe: str, base: Link | None = None) -> None:
        self.ktls = ktls
        self.base = base
        self.fd = ktls.fd
        self.describe = describe  # "TLSv1.3 AES-256-GCM", for the -v 2 line
        self._scratch = memoryview(bytearray(MAX_RECORD))
        self._write_shut = False

    # -- data ------------------------------------------------------------

    def move_out(self, cread: int) -> int:
        """Splice what the application wrote on the pipe ``cread`` into records.

        Returns the count, 0 at the pipe's EOF.  Raises ``WouldBlock`` on
        ``cread`` when the pipe is empty, on the socket when it is full;
        ``PeerGone`` when the peer reads nothing more; ``TlsRuntimeError``
        when the connection broke.
        """
        try:
            return self.ktls.splice_out(cread, SPLICE)
        except BlockingIOError:
            if poll_now(cread, select.POLLIN):
                raise WouldBlock(self.fd, select.POLLOUT) from None
            raise WouldBlock(cread, select.POLLIN) from None
        except (BrokenPipeError, ConnectionResetError):
            raise PeerGone from None
        except OSError as exc:
            raise TlsRuntimeError(f"connection broken: {exc.strerror}") from None

    def move_in(self, cwrite: int | None) -> int | None:
        """Move the next record's cleartext into the pipe ``cwrite``, or drop it (None).

        Returns the count of data bytes (moved or dropped), 0 at a bare EOF,
        ``PEER_CLOSE_NOTIFY`` at the peer's close_notify, or None for a record
        that changes nothing (a ticket, an answered renegotiation, a
        followed KeyUpdate).  Raises ``WouldBlock`` on the socket until a
        whole record is there, on ``cwrite`` when the pipe is full;
        ``BrokenPipeError`` when nobody reads the pipe any more;
        ``TlsRuntimeError`` for a bad record, a fatal alert, a protocol
        error (answered with an alert), a KeyUpdate the kernel cannot follow.
        """
        ktls = self.ktls
        try:
            n = ktls.splice_in(cwrite, SPLICE) if cwrite is not None else None
            if n is None:
                kind, n = ktls.read_record(self._scratch)
                if kind not in (0, APPLICATION_DATA):
                    return self._control(kind, bytes(self._scratch[:n]))
        except TlsRuntimeError:
            with contextlib.suppress(OSError):  # the kernel may refuse: it failed the socket
                ktls.send_alert(FATAL, BAD_RECORD_MAC)
            raise
        except BlockingIOError:
            if cwrite is not None and not poll_now(cwrite, select.POLLOUT):
                raise WouldBlock(cwrite, select.POLLOUT) from None
            ktls.await_record()
            raise WouldBlock(self.fd, select.POLLIN) from None
        except ConnectionResetError:
            raise TlsRuntimeError("connection broken: the peer reset the connection") from None
        ktls.record_read()
        return n

    def _control(self, kind: int, payload: bytes) -> int | None:
        """Act on a record that is not data (see the module docstring)."""
        self.ktls.record_read()
        answer = None
        for control in self.ktls.records.feed(kind, payload):
            if control.kind == "close_notify":
                answer = PEER_CLOSE_NOTIFY
            elif control.kind == "answer" and control.reply is not None:
                with contextlib.suppress(OSError):  # a courtesy: the peer goes on anyway
                    self.ktls.send_record(*control.reply)
            elif control.kind == "key_update":
                self.ktls.follow_key_update(control.update_requested)
            elif control.kind == "error":
                if control.alert is not None:
                    with contextlib.suppress(OSError):
                        self.ktls.send_alert(FATAL, control.alert)
                raise TlsRuntimeError(control.reason)
        return answer

    # -- the end, as a link ----------------------------------------------

    def notify(self) -> None:
        """Send our close_notify.  Raises ``WouldBlock``, ``PeerGone``."""
        try:
            self.ktls.send_alert(WARNING, CLOSE_NOTIFY)
        except BlockingIOError:
            raise WouldBlock(self.fd, select.POLLOUT) from None
        except (BrokenPipeError, ConnectionResetError):
            raise PeerGone from None
        except OSError as exc:
            raise TlsRuntimeError(f"connection broken: {exc.strerror}") from None

    def has_output(self) -> bool:
        return False

    def flush(self) -> None:
        """Nothing waits in userspace: the kernel writes what it encrypted."""

    def shut_write(self) -> None:
        """Half-close after what the kernel holds; our records are never lost to it."""
        self.abandon_write()

    def abandon_write(self) -> None:
        if not self._write_shut:
            self._write_shut = True
            self.ktls.shutdown_write()

    def close(self) -> None:
        """Shut our side, drop what the peer sent that nobody read (no RST), release."""
        self.abandon_write()
        for _ in range(_DRAIN):
            try:
                kind, n = self.ktls.read_record(self._scratch)
            except (OSError, TlsRuntimeError):
                break
            if kind == 0 and n == 0:
                break
        self.ktls.close()
        if self.base is not None:
            self.base.close()

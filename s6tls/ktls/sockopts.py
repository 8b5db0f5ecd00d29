"""A TCP socket whose record layer Linux runs (kernel TLS), and its record-level I/O.

``KernelTls.install`` hands a connection's keys to the kernel
(``TCP_ULP "tls"``, then ``SOL_TLS``/``TLS_TX`` and ``TLS_RX``); from then
on the socket carries cleartext for us and records on the wire:

* data moves with ``os.splice`` between the application's pipes and the
  socket (``splice_out``, ``splice_in``), never through Python;
* a record that is not data (an alert, a TLS 1.3 NewSessionTicket or
  KeyUpdate, a TLS 1.2 renegotiation request) stops ``splice`` with EINVAL
  and is read whole by ``read_record`` (``recvmsg`` with the
  ``TLS_GET_RECORD_TYPE`` control message);
* what we send that is not data (close_notify, an alert, a KeyUpdate) goes
  out through ``send_record`` (``sendmsg`` with ``TLS_SET_RECORD_TYPE``).

The kernel neither stops after a close_notify or a fatal alert nor answers
one: ``Records`` says what each record means, and the engine acts.
"""

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
from dataclasses import dataclass, replace

from ..errors import TlsRuntimeError
from .keys import (
    TLS_1_3_VERSION,
    ConnectionKeys,
    crypto_info,
    next_traffic_secret,
    traffic_keys,
)

# linux/tcp.h, linux/socket.h, linux/tls.h
TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

# TLS content types
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23

# alerts (RFC 8446 6, RFC 5246 7.2)
WARNING = 1
FATAL = 2
CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
BAD_RECORD_MAC = 20
DECODE_ERROR = 50
USER_CANCELED = 90
NO_RENEGOTIATION = 100
ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}

# handshake messages that may follow the handshake
HELLO_REQUEST = 0
CLIENT_HELLO = 1
NEW_SESSION_TICKET = 4
KEY_UPDATE = 24

MAX_RECORD = 16384 + 256  # a TLS 1.3 record's content, type and padding
_CMSG_SPACE = socket.CMSG_SPACE(1)
NO_MODULE = "this kernel has no tls module"


class Unavailable(Exception):
    """Kernel TLS cannot take this connection; the socket is as it was.

    The text says why, for the -v 2 line; the connection goes on in userspace.
    """


class HalfInstalled(TlsRuntimeError):
    """The kernel took one direction's key and refused the other's.

    Nothing can go on from there (the kernel already encrypts what we send,
    OpenSSL cannot), so the connection ends with 98.
    """


def tcp_socket(rfd: int, wfd: int) -> str | None:
    """None if ``rfd`` and ``wfd`` are one TCP socket; otherwise why kernel TLS cannot be used."""
    st_r, st_w = os.fstat(rfd), os.fstat(wfd)
    if not stat.S_ISSOCK(st_r.st_mode):
        return "the ciphertext descriptor is not a socket"
    if (st_r.st_dev, st_r.st_ino) != (st_w.st_dev, st_w.st_ino):
        return "the ciphertext descriptors are not one socket"
    with socket.socket(fileno=os.dup(rfd)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return "the ciphertext descriptor is not a TCP socket"
    return None


def kernel_refusal() -> str | None:
    """Why this kernel can take no connection's records at all; None if it may.

    Asked of a fresh TCP socket, at start: Linux looks the ``tls`` module up
    (loading it, for a user allowed to) before it checks that the socket is
    connected, so ENOTCONN means the module is there and ENOENT that it is
    not.  A connection may still be refused later for its own reasons (a
    suite the kernel lacks).  Never raises.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return NO_MODULE
        if exc.errno != errno.ENOTCONN:
            return f"unable to attach the tls module: {exc.strerror}"
    return None


@dataclass
class Control:
    """What a record that is not data means, for the engine.

    ``kind`` is one of ``"close_notify"``, ``"ignore"`` (a session ticket, a
    warning the protocol lets us ignore), ``"answer"`` (``reply`` must be
    sent, then go on: a refused renegotiation), ``"key_update"``
    (``update_requested`` says whether the peer wants ours too), or
    ``"error"`` (``reason`` says why, ``alert`` is what to send the peer, or
    None when it sent a fatal alert itself).
    """

    kind: str
    reason: str = ""
    alert: int | None = None
    reply: tuple[int, bytes] | None = None
    update_requested: bool = False


def _error(reason: str, alert: int | None = UNEXPECTED_MESSAGE) -> Control:
    return Control("error", reason=reason, alert=alert)


def alert_name(code: int) -> str:
    return ALERT_NAMES.get(code, f"alert {code}")


class Records:
    """The meaning of the non-data records a peer sends, with no I/O.

    Handshake messages may span records; what is not yet whole waits here
    (bounded: a message longer than a record is an error).
    """

    def __init__(self, version: int) -> None:
        self.tls13 = version == TLS_1_3_VERSION
        self._handshake = b""

    def feed(self, content_type: int, payload: bytes) -> list[Control]:
        """What a record of ``content_type`` carrying ``payload`` means, in order."""
        if content_type == ALERT:
            return [self._alert(payload)]
        if content_type == HANDSHAKE:
            return self._handshake_messages(payload)
        return [_error(f"peer sent a record of unexpected type {content_type}")]

    def _alert(self, payload: bytes) -> Control:
        if len(payload) != 2:
            return _error("peer sent a malformed alert", DECODE_ERROR)
        level, code = payload
        if code == CLOSE_NOTIFY:
            return Control("close_notify")
        if code == USER_CANCELED or (level == WARNING and not self.tls13):
            return Control("ignore")
        return _error(f"peer sent a fatal alert: {alert_name(code)}", None)

    def _handshake_messages(self, payload: bytes) -> list[Control]:
        data = self._handshake + payload
        out = []
        while len(data) >= 4:
            kind, length = data[0], int.from_bytes(data[1:4], "big")
            if length > MAX_RECORD:
                return [*out, _error("peer sent an oversized handshake message", DECODE_ERROR)]
            if len(data) < 4 + length:
                break
            out.append(self._message(kind, data[4 : 4 + length]))
            data = data[4 + length :]
        self._handshake = data
        return out

    def _message(self, kind: int, body: bytes) -> Control:
        if self.tls13 and kind == NEW_SESSION_TICKET:
            return Control("ignore")
        if self.tls13 and kind == KEY_UPDATE:
            if len(body) != 1 or body[0] > 1:
                return _error("peer sent a malformed KeyUpdate", DECODE_ERROR)
            return Control("key_update", update_requested=body[0] == 1)
        if not self.tls13 and kind in (HELLO_REQUEST, CLIENT_HELLO):
            # OpenSSL's answer under OP_NO_RENEGOTIATION: a warning, then go on.
            return Control("answer", reply=(ALERT, bytes([WARNING, NO_RENEGOTIATION])))
        return _error(f"peer sent an unexpected handshake message (type {kind})")


def key_update_message(update_requested: bool) -> bytes:
    """A TLS 1.3 KeyUpdate handshake message."""
    return bytes([KEY_UPDATE]) + (1).to_bytes(3, "big") + bytes([int(update_requested)])


class KernelTls:
    """One TCP socket with both directions' records run by the kernel.

    Owns a duplicate of the connection's descriptor (``close`` releases it);
    the descriptor the caller gave stays the caller's.
    """

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.fd = self.sock.fileno()
        self.keys: ConnectionKeys
        self.records: Records
        self._low_water = False

    @classmethod
    def install(cls, fd: int, keys: ConnectionKeys) -> "KernelTls":
        """Give ``keys`` to the kernel for the TCP socket ``fd``, after its handshake.

        Raises ``Unavailable`` when nothing was changed (no ``tls`` module,
        a key the kernel refuses): the caller goes on in userspace.  Raises
        ``HalfInstalled`` when the send key went in and the receive key did
        not.
        """
        ktls = cls(fd)
        try:
            ktls._install(keys)
        except BaseException:
            ktls.close()
            raise
        ktls.keys = keys
        ktls.records = Records(keys.version)
        return ktls

    def _install(self, keys: ConnectionKeys) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise Unavailable(NO_MODULE) from None
            if exc.errno == errno.ENOTCONN:  # the kernel takes only an established connection
                raise Unavailable("the peer already ended its side of the connection") from None
            raise Unavailable(f"unable to attach the tls module: {exc.strerror}") from None
        try:
            self.sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(keys.version, keys.suite, keys.tx))
        except OSError as exc:
            raise Unavailable(f"the kernel refused the send key: {exc.strerror}") from None
        try:
            self.sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(keys.version, keys.suite, keys.rx))
        except OSError as exc:
            raise HalfInstalled(
                f"kernel TLS took the send key but refused the receive key: {exc.strerror}"
            ) from None

    def follow_key_update(self, update_requested: bool) -> None:
        """Switch to the peer's next key after its KeyUpdate; answer it if asked.

        Raises ``TlsRuntimeError`` when the kernel cannot change keys (Linux
        before 6.14 refuses a second ``TLS_RX`` with EBUSY): the connection
        cannot go on.
        """
        keys = self.keys
        suite = keys.suite
        rx_secret = next_traffic_secret(keys.rx_secret, suite)
        rx = traffic_keys(rx_secret, suite)
        try:
            self.sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(keys.version, suite, rx))
        except OSError as exc:
            raise TlsRuntimeError(
                f"peer sent a KeyUpdate, and kernel TLS cannot change keys here: {exc.strerror}"
            ) from None
        keys = replace(keys, rx=rx, rx_secret=rx_secret)
        if update_requested:
            self.send_record(HANDSHAKE, key_update_message(False))
            tx_secret = next_traffic_secret(keys.tx_secret, suite)
            tx = traffic_keys(tx_secret, suite)
            self.sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(keys.version, suite, tx))
            keys = replace(keys, tx=tx, tx_secret=tx_secret)
        self.keys = keys

    # -- data ------------------------------------------------------------

    def splice_out(self, pipe_r: int, size: int) -> int:
        """Move up to ``size`` bytes from the pipe ``pipe_r`` into records.

        Returns the count, 0 at the pipe's EOF.  Raises ``BlockingIOError``
        when the pipe is empty or the socket full, ``BrokenPipeError`` when
        the peer no longer reads.
        """
        return os.splice(pipe_r, self.fd, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)

    def splice_in(self, pipe_w: int, size: int) -> int | None:
        """Move up to ``size`` cleartext bytes of data records into the pipe ``pipe_w``.

        Returns the count, 0 at a FIN, or None when the next record is not
        data (read it with ``read_record``).  Raises ``BlockingIOError`` when
        no whole record is there or the pipe is full, ``TlsRuntimeError``
        when a record does not decrypt, ``OSError`` otherwise.
        """
        try:
            return os.splice(self.fd, pipe_w, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise _record_error(exc) from None

    def await_record(self) -> None:
        """Before polling for the next record, after ``BlockingIOError``.

        A partial record in the socket makes poll report POLLIN at once,
        while splice and recvmsg answer EAGAIN until it is whole: a loop
        would spin as long as a slow peer takes to send the rest.  So the
        socket's SO_RCVLOWAT is set just above what it holds, and poll
        sleeps until more arrives (an EOF wakes it too).
        """
        queued = struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4))[0]
        if queued:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, queued + 1)
            self._low_water = True

    def record_read(self) -> None:
        """After a record was read: poll reports any byte again (undoes ``await_record``)."""
        if self._low_water:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            self._low_water = False

    def read_record(self, buf: memoryview) -> tuple[int, int]:
        """Read the next record's content into ``buf``: (content type, length).

        A length of 0 with type 0 is a FIN.  Raises ``BlockingIOError`` when
        no whole record is there, ``TlsRuntimeError`` when it does not
        decrypt.
        """
        try:
            n, ancdata, _flags, _addr = self.sock.recvmsg_into([buf], _CMSG_SPACE)
        except OSError as exc:
            if isinstance(exc, BlockingIOError):
                raise
            raise _record_error(exc) from None
        for level, kind, data in ancdata:
            if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE:
                return data[0], n
        return (APPLICATION_DATA if n else 0), n

    def send_record(self, content_type: int, payload: bytes) -> None:
        """Send one record that is not data (an alert, a handshake message).

        Raises ``BlockingIOError`` when the socket is full (nothing was
        sent), ``OSError`` otherwise.
        """
        self.sock.sendmsg([payload], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([content_type]))])

    def send_alert(self, level: int, code: int) -> None:
        self.send_record(ALERT, bytes([level, code]))

    def shutdown_write(self) -> None:
        """Half-close: a FIN after what was sent.  A reset connection is no error here."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _record_error(exc: OSError) -> Exception:
    """A receive failure as s6tls reports it: a bad record is a TLS error (98)."""
    if exc.errno in (errno.EBADMSG, errno.EIO):
        return TlsRuntimeError("TLS error: a record from the peer failed to decrypt")
    if exc.errno == errno.EMSGSIZE:
        return TlsRuntimeError("TLS error: the peer sent an oversized record")
    return exc

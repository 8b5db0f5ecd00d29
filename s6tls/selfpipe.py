"""Signals as bytes on a pipe: skalibs' selfpipe, the Python way.

A poll loop cannot safely do work inside a signal handler.  ``SelfPipe``
installs a handler that does nothing for each signal it is given, and points
``signal.set_wakeup_fd`` at a non-blocking pipe: the interpreter's C-level
handler writes the signal number there as one byte.  The loop polls
``fileno()`` for reading and calls ``read()`` to learn which signals came.

Usage::

    with SelfPipe((signal.SIGCHLD, signal.SIGTERM)) as sp:
        ...  # poll sp.fileno() with the other fds
        for sig in sp.read():
            ...

It must be entered in the main thread.  Create it *before* forking a child
whose death you want to hear about, so that no SIGCHLD can be lost.
"""

import os
import signal
from collections.abc import Iterable
from types import FrameType


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the byte on the pipe is all the work there is."""


def read_signals(fd: int) -> list[int]:
    """The signals pending on the selfpipe's read end ``fd``, each once, oldest first.

    ``fd`` is non-blocking: never blocks; an empty list when nothing is pending.
    """
    data = b""
    try:
        while chunk := os.read(fd, 256):
            data += chunk
    except BlockingIOError:
        pass
    return list(dict.fromkeys(data))


class SelfPipe:
    """A context manager that delivers the given signals as bytes on a pipe."""

    def __init__(self, signals: Iterable[int] = (signal.SIGCHLD,)) -> None:
        self.signals = tuple(signals)
        self._rfd = -1
        self._wfd = -1
        self._saved: dict[int, object] = {}
        self._saved_wakeup = -1

    def __enter__(self) -> "SelfPipe":
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._saved_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        for sig in self.signals:
            self._saved[sig] = signal.signal(sig, _ignore)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._saved.clear()
        signal.set_wakeup_fd(self._saved_wakeup)
        os.close(self._rfd)
        os.close(self._wfd)
        self._rfd = self._wfd = -1

    def fileno(self) -> int:
        """The fd to poll for reading; readable when a signal is pending."""
        return self._rfd

    def read(self) -> list[int]:
        """Return the signals received since the last call, each once, oldest first.

        Never blocks; returns an empty list when nothing is pending.
        """
        return read_signals(self._rfd)

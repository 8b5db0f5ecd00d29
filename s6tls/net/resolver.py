"""Host names from the system resolver (nsswitch: /etc/hosts, DNS...), with a deadline.

s6-networking asks DNS servers itself (s6-dns); s6tls asks the C library,
so names come from wherever the system is configured to look, in its order.
Each question can be bounded by a deadline: the C library's calls cannot be
interrupted, so a question runs in a thread and is abandoned (the thread
keeps running until the library gives up) when the deadline passes.
"""

import encodings.idna  # noqa: F401  (socket decodes names with it: import it before the drop)
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# h_errno values of gethostbyaddr that mean "there is no name", not "failed".
_NO_NAME = (1, 4)  # HOST_NOT_FOUND, NO_DATA
_NO_ADDRESS = (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))


class LookupFailed(Exception):
    """The resolver could not answer (timeout, server failure): not the same as "no name"."""


class SystemResolver:
    """Names and addresses from the C library, each question bounded by ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value, or None for the library's
    own limits.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline

    def name_of(self, ip: str) -> str | None:
        """The name of ``ip`` (PTR, or /etc/hosts), None if it has none.

        Raises ``LookupFailed`` when the resolver fails or the deadline passes.
        """

        def ask() -> str | None:
            try:
                return socket.gethostbyaddr(ip)[0]
            except socket.herror as exc:
                if exc.errno in _NO_NAME:
                    return None
                raise LookupFailed(exc.strerror or str(exc)) from None
            except socket.gaierror as exc:
                if exc.errno in _NO_ADDRESS:
                    return None
                raise LookupFailed(exc.strerror or str(exc)) from None

        return self.bounded(ask)

    def addresses_of(self, name: str, version: int) -> set[str]:
        """The IPv``version`` addresses of ``name``, empty if it has none.

        Raises ``LookupFailed`` when the resolver fails or the deadline passes.
        """
        family = socket.AF_INET6 if version == 6 else socket.AF_INET

        def ask() -> set[str]:
            try:
                infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
            except socket.gaierror as exc:
                if exc.errno in _NO_ADDRESS:
                    return set()
                raise LookupFailed(exc.strerror or str(exc)) from None
            return {info[4][0] for info in infos}

        return self.bounded(ask)

    def bounded(self, ask: Callable[[], T]) -> T:
        """``ask()``, abandoned with ``LookupFailed("timed out")`` at the deadline.

        Whatever ``ask`` raises is raised here.
        """
        if self.deadline is None:
            return ask()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise LookupFailed("timed out")
        box: list = []

        def run() -> None:
            try:
                box.append((True, ask()))
            except BaseException as exc:  # handed to the caller, never lost in the thread
                box.append((False, exc))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(left)
        if not box:
            raise LookupFailed("timed out")
        ok, value = box[0]
        if not ok:
            raise value
        return value

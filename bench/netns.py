"""Network namespaces for the per-connection benchmarks: loopback with and without quickack.

Some servers answer a handshake in two writes (the real s6-networking with
BearSSL writes ChangeCipherSpec and Finished apart): the second waits for
the client's delayed ACK, about 40 ms on Linux's loopback, and the server
makes about 20 handshakes per second whatever its CPU.  In a network
namespace whose loopback routes carry ``quickack 1`` every segment is
acknowledged at once, and what is left to measure is the work.

``make("quickack", quickack=True)`` creates such a namespace (``unshare``
of the network, then ``ip link set lo up`` and ``ip route change local ...
quickack 1``), ``make("loopback")`` the same without quickack; each is kept
alive by an open descriptor, and ``inside(net)`` moves this process into it
(``setns``) for a block: whatever it starts there (servers, clients) stays
there, and its own sockets and ``/proc/net`` reads are there too.  This
process must be single-threaded (``setns`` moves the calling thread only).
Needs root (CAP_SYS_ADMIN); ``available()`` says whether it works.
"""

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
QUICKACK_ROUTES = ("127.0.0.0/8", "127.0.0.1")
_libc = ctypes.CDLL(None, use_errno=True)
_host: int | None = None  # our own namespace, to come back to


@dataclass(frozen=True)
class Network:
    """A network to measure in: ``name`` for the report, ``fd`` its namespace (None: ours)."""

    name: str
    fd: int | None = None


HOST = Network("host")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def make(name: str, quickack: bool = False) -> Network:
    """A new namespace with its loopback up (and quickack on its routes); we stay in ours."""
    global _host
    if _host is None:
        _host = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    try:
        _ip("link", "set", "lo", "up")
        if quickack:
            for route in QUICKACK_ROUTES:
                _ip(
                    *("route", "change", "local", route, "dev", "lo", "proto", "kernel"),
                    *("scope", "host", "src", "127.0.0.1", "table", "local", "quickack", "1"),
                )
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        _setns(_host)
    return Network(name, fd)


def available() -> str | None:
    """None if namespaces with quickack can be made here, else why not."""
    try:
        net = make("probe", quickack=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    assert net.fd is not None
    os.close(net.fd)
    return None


@contextlib.contextmanager
def inside(net: Network) -> Iterator[None]:
    """This process in ``net``'s namespace for the block (nothing for ``HOST``)."""
    if net.fd is None:
        yield
        return
    assert _host is not None
    _setns(net.fd)
    try:
        yield
    finally:
        _setns(_host)

"""Starting s6-tlsserver for a test and talking to it."""

import contextlib
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from conftest import program

APPS = Path(__file__).resolve().parent / "apps"
# s6-tlsserver's lines at a connection's start and end (-v): who, and the end's
# application pid (or -) and exit code, and the count of connections.
ALLOW_LINE = re.compile(r"info: allow (\S+) port (\d+) count (\d+)/(\d+)")
END_LINE = re.compile(r"info: end (\S+) port (\d+) pid (\S+) status (\d+) count (\d+)/(\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (for a test that needs a refused connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    args: Sequence[str],
    prog: Sequence[str],
    env: Mapping[str, str],
    host: str = "127.0.0.1",
    name: str = "s6-tlsserver",
    new_session: bool = False,
) -> tuple[subprocess.Popen, int]:
    """Start ``name -1 args host 0 prog``; return it and the port it wrote once bound.

    ``name``: s6-tlsserver, or s6-dtlsserver.  ``new_session``: in a session
    (and process group) of its own, which the caller can kill as a whole.
    """
    proc = subprocess.Popen(
        [*program(name), "-1", *args, host, "0", *prog],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # -1: the port and a newline, once the socket listens
    if not line.endswith(b"\n") or not line[:-1].isdigit():
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        raise AssertionError(f"{name} did not start: {line!r} {err.decode()}")
    return proc, int(line)


@contextlib.contextmanager
def serving(
    args: Sequence[str], prog: Sequence[str], env: Mapping[str, str], host: str = "127.0.0.1"
) -> Iterator[tuple[subprocess.Popen, int]]:
    """``start_server`` for the length of a ``with`` block: then SIGTERM, and reaped."""
    proc, port = start_server(args, prog, env, host)
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def tls_connect(port: int, cafile: str, host: str = "127.0.0.1") -> ssl.SSLSocket:
    """A verified TLS client connection (stdlib ssl) to the server, handshake done."""
    ctx = ssl.create_default_context(cafile=cafile)
    sock = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (zombies included)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def zombies(pid: int) -> list[int]:
    """Children of ``pid`` that are zombies."""
    out = []
    for child in child_pids(pid):
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            out.append(child)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def full_listener() -> Iterator[int]:
    """A loopback port whose listen queue is full: a new SYN is never answered.

    Connecting to it times out, on loopback, without sending a packet
    anywhere else.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        with socket.create_connection(sock.getsockname(), timeout=10):
            yield sock.getsockname()[1]


def lines_with(proc: subprocess.Popen, needle: str, count: int, timeout: float = 30) -> list[str]:
    """Read ``proc``'s stderr until ``count`` lines holding ``needle`` came; return those lines.

    A child of s6-tlsserver logs its connection's end after the client has
    gone: read the log before stopping the server, not after.
    """
    from ucspi_helpers import LineReader

    reader = LineReader(proc.stderr)
    found: list[str] = []
    while len(found) < count:
        line = reader.readline(timeout)
        assert line, f"the log ended with {found}"
        if needle in line:
            found.append(line)
    return found

"""Running s6-tlsd and s6-tlsc the way super-servers run them, and reading what they say.

Two ways to start a program under test:

- under Debian's ucspi-tcp, as users do: ``TcpServer`` runs
  ``tcpserver -1 -v -H -R -l 0 127.0.0.1 0 s6-tlsd ... -- prog`` and learns its
  port from the ``-1`` line (no port race, no polling); ``tcpclient`` runs
  ``tcpclient -H -R -l 0 127.0.0.1 PORT s6-tlsc ... -- prog``;
- directly on one end of a loopback TCP connection (``tcp_pair``), which is
  exactly what a super-server hands over, when a test needs the program's own
  exit code and stderr: ``spawn_tlsd`` (socket on fds 0 and 1) and
  ``spawn_tlsc`` (socket on fds 6 and 7).

Every wait has a deadline; nothing sleeps.
"""

import fcntl
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from conftest import program

TLSD = program("s6-tlsd")
TLSC = program("s6-tlsc")
PY = [sys.executable, "-I", "-c"]

# Applications: what the program under test runs once the handshake is done.
SERVER_PRINT_ENV = [*PY, "import os,sys; sys.stdout.write(repr(dict(os.environ)))"]
CLIENT_PRINT_ENV = [
    *PY,
    "import os; os.close(7); reply = b''\n"
    "while chunk := os.read(6, 1 << 16): reply += chunk\n"
    "print(repr((dict(os.environ), eval(reply) if reply else None)))",
]


def touch_then(marker: Path, *prog: str) -> list[str]:
    """An application that creates ``marker`` first, then execs ``prog``.

    The marker proves whether the application was started at all.
    """
    return ["sh", "-c", 'touch "$0" && exec "$@"', str(marker), *prog]


class LineReader:
    """Lines from a pipe, each read with a deadline."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buf = b""
        self.eof = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def readline(self, timeout: float = 30) -> str:
        """The next line without its newline; '' at EOF; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise AssertionError(f"no line within {timeout} s; so far: {self.buf!r}")
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")

    def until(self, needle: str, timeout: float = 30) -> list[str]:
        """The lines up to the first that holds ``needle``, that one included."""
        lines = [self.readline(timeout)]
        while needle not in lines[-1]:
            assert lines[-1], f"the log ended before {needle!r}: {lines}"
            lines.append(self.readline(timeout))
        return lines


class TcpServer:
    """``tcpserver -1 -v -H -R -l 0 127.0.0.1 0 s6-tlsd ARGS -- PROG``, listening.

    ``tool`` replaces s6-tlsd (s6-ucspitlsd, for instance).

    ``-1`` makes tcpserver print its port once it listens: that line is the
    readiness notification.  ``-v`` makes it log ``end PID status S`` for each
    connection, from which ``wait_end`` reads s6-tlsd's exit code.
    """

    def __init__(
        self,
        args: Sequence[str],
        prog: Sequence[str],
        env: Mapping[str, str],
        tool: Sequence[str] = TLSD,
    ) -> None:
        argv = ["tcpserver", "-1", "-v", "-H", "-R", "-l", "0", "127.0.0.1", "0"]
        self.proc = subprocess.Popen(
            [*argv, *tool, *args, "--", *prog],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.log = LineReader(self.proc.stderr)
        self.ended = 0  # the pid that served the last connection wait_end saw
        line = LineReader(self.proc.stdout).readline(timeout=20)
        if not line.isdigit():
            self.stop()
            raise AssertionError(f"tcpserver did not start: {line!r}")
        self.port = int(line)

    def wait_end(self, timeout: float = 30) -> tuple[int, list[str]]:
        """Wait for the next connection's end; return s6-tlsd's exit code and its stderr lines.

        ``ended`` is then the pid of the process that served it.

        The lines are everything on the shared stderr that is not tcpserver's
        own log: what s6-tlsd (or prog) wrote.
        """
        lines = []
        while True:
            line = self.log.readline(timeout)
            assert line, f"tcpserver's log ended; so far {lines}"
            if line.startswith("tcpserver: end "):
                self.ended = int(line.split()[2])
                status = int(line.rsplit(" ", 1)[1])
                return os.waitstatus_to_exitcode(status), lines
            if not line.startswith("tcpserver: "):
                lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=10)

    def __enter__(self) -> "TcpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tcpclient(
    port: int,
    args: Sequence[str],
    prog: Sequence[str],
    env: Mapping[str, str],
    *,
    input: bytes | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess:
    """``tcpclient -H -R -l 0 127.0.0.1 PORT s6-tlsc ARGS -- PROG``, run to its end.

    tcpclient execs s6-tlsc, so the return code is s6-tlsc's.
    """
    argv = ["tcpclient", "-H", "-R", "-l", "0", "127.0.0.1", str(port)]
    return subprocess.run(
        [*argv, *TLSC, *args, "--", *prog],
        env=dict(env),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP connection: (server end, client end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    return server, client


def spawn_tlsd(
    args: Sequence[str], prog: Sequence[str], env: Mapping[str, str], sock: socket.socket
) -> subprocess.Popen:
    """s6-tlsd with ``sock`` on its stdin and stdout, as tcpserver runs it.

    Our copy of ``sock`` is closed; stderr is a pipe.
    """
    proc = subprocess.Popen(
        [*TLSD, *args, "--", *prog],
        env=dict(env),
        stdin=sock,
        stdout=sock,
        stderr=subprocess.PIPE,
    )
    sock.close()
    return proc


def spawn_tlsc(
    args: Sequence[str],
    prog: Sequence[str],
    env: Mapping[str, str],
    sock: socket.socket | None,
) -> subprocess.Popen:
    """s6-tlsc with ``sock`` on its fds 6 and 7, as tcpclient runs it.

    With ``sock`` None, fds 6 and 7 are not open.  Our copy of ``sock`` is
    closed; stdout and stderr are pipes.
    """
    fd = sock.fileno() if sock is not None else -1
    proc = spawn_tlsc_on(args, prog, env, (fd, fd))
    if sock is not None:
        sock.close()
    return proc


def spawn_tlsc_on(
    args: Sequence[str], prog: Sequence[str], env: Mapping[str, str], fds: tuple[int, int]
) -> subprocess.Popen:
    """s6-tlsc reading the network on ``fds[0]`` as its fd 6, writing on ``fds[1]`` as its fd 7.

    -1 leaves that descriptor closed.  Our copies stay open; stdout and
    stderr are pipes.
    """

    def on_6_and_7() -> None:
        # dup2 clears close-on-exec on the copies, but not when a fd is
        # already 6 or 7: copy each above them first.
        sources = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) if fd >= 0 else -1 for fd in fds]
        for src, target in zip(sources, (6, 7), strict=True):
            if src >= 0:
                os.dup2(src, target)

    return subprocess.Popen(
        [*TLSC, *args, "--", *prog],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=on_6_and_7,
        close_fds=False,  # our own fds are close-on-exec anyway
    )


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, bytes, str]:
    """Wait for ``proc``; return its exit code, stdout and stderr."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or b"", (err or b"").decode(errors="replace")


def fatal(stderr: str | list[str], prog: str) -> str:
    """The text of the single ``PROG: fatal: ...`` line that is all of ``stderr``.

    The ``peer IP:PORT pid N: `` that starts the line of a connection is left
    out (``connection_fatal`` checks it).  Fails if there is anything else: a
    second line, a traceback.
    """
    lines = stderr if isinstance(stderr, list) else stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    match = re.fullmatch(rf"{re.escape(prog)}: fatal: (?:{CONNECTION})?(.*)", lines[0])
    assert match, lines[0]
    return match[1]


CONNECTION = r"peer \S+ pid [0-9]+: "  # what a connection's log lines start with


def unprefixed(text: str) -> str:
    """``text`` (a program's stderr) without the ``peer IP:PORT pid N: `` of its lines."""
    return re.sub(rf"^([\w-]+: \w+: ){CONNECTION}", r"\1", text, flags=re.M)


def connection_fatal(line: str, prog: str, pid: int, ip: str = "127.0.0.1") -> str:
    """The text of ``line``, which must be ``PROG: fatal: peer IP:PORT pid PID: text``."""
    match = re.fullmatch(
        rf"{re.escape(prog)}: fatal: peer {re.escape(ip)}:[0-9]+ pid {pid}: (.*)", line
    )
    assert match, line
    return match[1]


def openssl_subject(cert: str) -> str:
    """The certificate's subject in OpenSSL's one-line form, from the openssl CLI."""
    out = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-subject", "-nameopt", "compat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    return out.removeprefix("subject=")


def openssl_sha256(cert: str) -> str:
    """``SHA256:`` + the lowercase hex SHA-256 of the certificate's DER, from the openssl CLI."""
    out = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    return "SHA256:" + out.split("=", 1)[1].replace(":", "").lower()


def direct_pair(
    server: tuple[Sequence[str], Sequence[str], Mapping[str, str]],
    client: tuple[Sequence[str], Sequence[str], Mapping[str, str]],
    timeout: float = 30,
) -> tuple[tuple[int, bytes, str], tuple[int, bytes, str]]:
    """s6-tlsd and s6-tlsc on the two ends of one loopback TCP connection.

    ``server`` and ``client`` are (args, prog, env).  Returns ``finish()``'s
    (code, stdout, stderr) for the server, then for the client.
    """
    s, c = tcp_pair()
    tlsd = spawn_tlsd(*server, s)
    tlsc = spawn_tlsc(*client, c)
    try:
        return finish(tlsd, timeout), finish(tlsc, timeout)
    finally:
        for p in (tlsd, tlsc):
            if p.poll() is None:
                p.kill()
                p.wait()


def exchange_environments(
    port: int, client_args: Sequence[str], client_env: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Connect with s6-tlsc under tcpclient to a server running ``SERVER_PRINT_ENV``.

    Returns (what the client application saw, what the server application saw).
    """
    res = tcpclient(port, client_args, CLIENT_PRINT_ENV, client_env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""
    seen_by_client, seen_by_server = eval(res.stdout)
    return seen_by_client, seen_by_server


def synopsis_options(page: Path) -> set[str]:
    """The options a man page's SYNOPSIS lists, such as ``-S`` or ``--idle-timeout``."""
    text = page.read_text().split(".SH SYNOPSIS", 1)[1].split("\n.SH ", 1)[0]
    found = re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", text.replace("\\-", "-"))
    return set(found)


def help_options(argv: Sequence[str]) -> set[str]:
    """The options a program's ``--help`` lists, each by its first name (``-S``, ``--sni``).

    ``--help`` and ``--version`` are left out.
    """
    out = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = set()
    for line in out.split("Options:\n", 1)[1].split("\n\n", 1)[0].splitlines():
        if line.startswith("  -"):
            found.add(line.split()[0].rstrip(",").split("=")[0])
    return found - {"--help", "--version"}

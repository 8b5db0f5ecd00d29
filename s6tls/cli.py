"""What every s6tls program shares at its edges: its log lines and its exit.

``Log`` writes every line s6tls prints on stderr, in skarnet's format
(``PROGRAM: fatal: ...``, ``warning``, ``info``), and escapes every byte
outside printable ASCII, and the backslash, as ``\\xHH``: nothing a peer
sends (a server name, a certificate subject, an alert text) can start a new
line, move the terminal or read as another string.  Lines about one
connection carry its peer and pid:
``s6-tlsserver: warning: peer [::1]:41000 pid 77: tlsv1 alert unknown ca``.

``failure`` is the only place that turns an exception into an exit code
and its one line: ``run_main`` for a whole program, and every process
that serves a connection on its own (a fork-server's child, the STARTTLS
engine) report with it.  Tracebacks appear only at verbosity 3 or more.
"""

import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from .errors import ExitCode, S6tlsError
from .options import BadUsage, ShowText

_ESCAPED = re.compile(r"[^\x20-\x5b\x5d-\x7e]+")  # and the backslash


def escape(text: str) -> str:
    r"""``text`` with every byte outside printable ASCII written ``\xHH``.

    The backslash too (``\x5C``), so that an escape and text that looks
    like one differ.  Characters are taken as their UTF-8 bytes (lone
    surrogates, from bytes that were not UTF-8, as the bytes they stand for).
    """

    def hexes(match: re.Match[str]) -> str:
        raw = match.group().encode("utf-8", "surrogateescape")
        return "".join(f"\\x{byte:02X}" for byte in raw)

    return _ESCAPED.sub(hexes, text)


def plural(count: int, noun: str) -> str:
    """``1 connection``, ``2 connections``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class Log:
    """Lines on stderr in skarnet's format, filtered by verbosity (-v).

    ``prefix`` goes before every text: ``Log.about`` makes the logger of one
    connection, whose lines start with its peer and pid.
    """

    def __init__(self, prog: str, verbosity: int = 1, prefix: str = "") -> None:
        self.prog = prog
        self.verbosity = verbosity
        self.prefix = prefix

    def about(self, peer: str, pid: int) -> "Log":
        """A logger for one connection: ``peer IP:PORT pid N: `` before each line."""
        return Log(self.prog, self.verbosity, f"peer {peer or '-'} pid {pid}: ")

    def _emit(self, kind: str, text: str) -> None:
        sys.stderr.write(f"{self.prog}: {kind}: {escape(self.prefix + text)}\n")
        sys.stderr.flush()

    def fatal(self, text: str) -> None:
        self._emit("fatal", text)

    def usage(self, text: str) -> None:
        """``PROG: usage: PROG [ options ] ...``, skalibs' ``dieusage`` line."""
        self._emit("usage", text)

    def warn(self, text: str) -> None:
        if self.verbosity >= 1:
            self._emit("warning", text)

    def info(self, text: str) -> None:
        if self.verbosity >= 2:
            self._emit("info", text)

    def traceback(self) -> None:
        """At verbosity 3 or more, the traceback of the exception being handled, escaped."""
        exc = sys.exc_info()[1]
        if self.verbosity < 3 or exc is None:
            return
        stack = "".join(traceback.format_tb(exc.__traceback__)).splitlines()
        # The message stays one line: a newline in it (from a peer) is escaped too.
        last = f"{type(exc).__name__}: {exc}"
        for line in ("Traceback (most recent call last):", *stack, last):
            sys.stderr.write(escape(line) + "\n")
        sys.stderr.flush()


def failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line that report ``exc``.

    Ours (``S6tlsError``) say what they are; an ``OSError`` is a system
    call that failed (111); anything else is a bug of ours, still one line
    (111), never a traceback.
    """
    if isinstance(exc, S6tlsError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError):
        what = f"{exc.filename}: " if exc.filename else ""
        return ExitCode.SYSTEM, f"{what}{exc.strerror or exc}"
    return ExitCode.SYSTEM, f"internal error: {type(exc).__name__}: {exc}"


def run_main(log: Log, body: Callable[[], int]) -> NoReturn:
    """Run ``body`` as a whole program and exit with the right code.

    ``body`` returns the exit code.  A ``BadUsage`` prints the program's
    synopsis (``PROG: usage: ...``), any other error one ``fatal`` line.
    """
    # Ctrl-C kills us as it kills a C program, with no message; once an
    # application runs, the engine catches SIGINT and passes it on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        code = body()
    except ShowText as shown:
        sys.stdout.write(shown.text)
        sys.stdout.flush()
        code = ExitCode.OK
    except BadUsage as exc:
        log.usage(str(exc))
        code = exc.exit_code
    except Exception as exc:
        code, line = failure(exc)
        log.fatal(line)
        log.traceback()
    sys.exit(int(code))

"""What every s6tls program shares: its options, its messages, its exit.

This is the only module that turns an exception into an exit code and one
line on stderr: ``PROGRAM: fatal: what went wrong``.  Tracebacks appear only
at verbosity 3 or more.
"""

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

import click

from .errors import ExitCode, S6tlsError

F = TypeVar("F", bound=Callable[..., object])

CONTEXT_SETTINGS = {"allow_interspersed_args": False, "help_option_names": ["--help"]}


class Log:
    """Messages on stderr in skarnet's format, filtered by verbosity (-v)."""

    def __init__(self, prog: str, verbosity: int = 1) -> None:
        self.prog = prog
        self.verbosity = verbosity

    def _emit(self, kind: str, text: str) -> None:
        sys.stderr.write(f"{self.prog}: {kind}: {text}\n")
        sys.stderr.flush()

    def fatal(self, text: str) -> None:
        self._emit("fatal", text)

    def warn(self, text: str) -> None:
        if self.verbosity >= 1:
            self._emit("warning", text)

    def info(self, text: str) -> None:
        if self.verbosity >= 2:
            self._emit("info", text)


def close_options(f: F) -> F:
    """-S/-s, -J/-j: how the end of each direction is handled."""
    f = click.option(
        "-S/-s",
        "close_notify",
        default=False,
        help="On EOF from prog: -S sends close_notify; -s (default) only half-closes.",
    )(f)
    return click.option(
        "-J/-j",
        "strict_close_notify",
        default=False,
        help="Peer EOF without close_notify: -J is a fatal error (98); -j (default) an EOF.",
    )(f)


def common_options(f: F) -> F:
    """The options of s6-tlsd and s6-tlsc: ``tls_options`` and -v N."""
    f = tls_options(f)
    return click.option(
        "-v", "verbosity", type=click.IntRange(min=0), default=1, metavar="N", help="Verbosity."
    )(f)


def verbosity_flags(f: F) -> F:
    """-q, -Q, -v: s6-tcpserver's verbosity flags (0, 1, 2); None when none is given."""
    for flag, level, text in (("-q", 0, "Quiet."), ("-Q", 1, "Warnings."), ("-v", 2, "Verbose.")):
        f = click.option(flag, "verbosity", flag_value=level, help=text)(f)
    return f


def tls_options(f: F) -> F:
    """The TLS options every s6tls program takes: -S/-s, -J/-j, -Z/-z, -K, --idle-timeout."""
    f = close_options(f)
    f = click.option(
        "-Z/-z",
        "keep_env",
        default=False,
        help="-Z keeps CERTFILE, KEYFILE, CAFILE... in prog's environment; -z removes them.",
    )(f)
    f = click.option(
        "-K",
        "handshake_timeout_ms",
        type=click.IntRange(min=0),
        default=0,
        metavar="MS",
        help="Handshake timeout in milliseconds (0: none); on expiry exit 98.",
    )(f)
    return click.option(
        "--idle-timeout",
        "idle_timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="SECONDS",
        help="Close the connection when no application data moved for this long.",
    )(f)


def run_main(prog: str, command: click.Command, argv: Sequence[str] | None, log: Log) -> NoReturn:
    """Run a click command as an s6tls program and exit with the right code.

    ``command`` returns the exit code.  ``log`` is the program's logger; the
    command sets its verbosity once the options are parsed.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        code = exc.exit_code
    except click.ClickException as exc:
        log.fatal(f"{_lower_first(exc.format_message())} (see {prog} --help)")
        code = ExitCode.USAGE
    except S6tlsError as exc:
        _report(log, str(exc))
        code = exc.exit_code
    except OSError as exc:
        what = f"{exc.filename}: " if exc.filename else ""
        _report(log, f"{what}{exc.strerror or exc}")
        code = ExitCode.SYSTEM
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug of ours: still one line, never a traceback
        _report(log, f"internal error: {type(exc).__name__}: {exc}")
        code = ExitCode.SYSTEM
    sys.exit(int(code or 0))


def _report(log: Log, text: str) -> None:
    log.fatal(text)
    if log.verbosity >= 3:
        traceback.print_exc()


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:].rstrip(".")

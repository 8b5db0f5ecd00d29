"""The one path every s6tls program takes, from its command line to its connections.

A program is a ``Program``: its name, its role, its options (``options``
tables), its operands, and its network side (``serve``).  ``main`` runs
the shared steps, in this order, so that a problem is reported before the
network is touched:

1. parse the command line (bad usage: one line, exit 100);
2. read the environment into a validated ``TlsConfig`` (``tls.config``);
3. refuse what can never work: ids that cannot be dropped to
   (``serve.privileges.check_ids``), an application that cannot be executed
   (127 when not found, 126 when not executable);
4. build the TLS context, once (``tls.context``), and print the start-up
   warnings (``announce``);
5. call the program's ``serve`` with a ``Setup`` (``serve.connection``),
   whose ``serve_connection`` drops privileges, then serves a connection.

The application's environment is the caller's: what Python adds to its own
(``LC_CTYPE``, when it coerces the C locale) is taken back first.
"""

import dataclasses
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__, options
from .cli import Log, run_main
from .errors import AppNotExecutable, AppNotFound
from .options import Operand, Opt, Settings
from .serve.connection import Setup
from .serve.privileges import Ids, as_ids, check_ids, ids_from_config, ids_from_options
from .tls.config import Options, Role, TlsConfig, no_tickets_conf

if TYPE_CHECKING:
    pass

_TLS_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))

EXIT_CODES = (
    ("96", "a certificate, key or CA file that cannot be used"),
    ("97", "the handshake failed, or the peer was rejected"),
    ("98", "TLS error after the handshake; the handshake timed out (-K)"),
    ("100", "usage: a bad option, operand or environment variable"),
    ("111", "a system call failed"),
    ("126, 127", "prog cannot be executed, or is not found"),
)


@dataclass(frozen=True)
class Program:
    """One s6tls program: what is its own; ``main`` does the rest.

    ``serve`` is the network side: it gets the ``Setup`` and returns the
    exit code.  ``adjust`` may fill in values that follow from others
    before the configuration is read (s6-tlsclient's server name).
    ``environment`` and ``exit_codes`` are the last two parts of --help.
    ``issues_tickets``: a server whose connections are served by children of
    one process, which can resume each other's sessions (s6-tlsserver); any
    other server sends no session ticket.  ``dtls``: the program speaks DTLS
    (``TlsConfig.dtls``).
    """

    name: str
    role: Role
    summary: str
    options: tuple[Opt, ...]
    serve: Callable[["Setup"], int]
    operands: tuple[Operand, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    exit_codes: tuple[tuple[str, str], ...] = EXIT_CODES
    adjust: Callable[[dict[str, Any]], None] | None = None
    issues_tickets: bool = False
    dtls: bool = False

    def usage(self) -> str:
        """The one-line synopsis, as in the man page."""
        return f"{self.name} {options.synopsis(self.options, self.operands)}"

    def help(self) -> str:
        """The text of --help: synopsis, options, environment, exit codes."""
        lines = [*_wrap_synopsis(f"usage: {self.usage()}"), "", self.summary, "", "Options:"]
        lines += options.option_lines(self.options)
        if self.environment:
            lines += ["", "Environment variables read:"]
            lines += options.columns(self.environment)
        lines += ["", "Exit codes (once prog runs, its own status):"]
        lines += options.columns(self.exit_codes, 12)
        lines += ["", f"See man {self.name}."]
        return "\n".join(lines) + "\n"


def _wrap_synopsis(text: str, width: int = 79) -> list[str]:
    """The synopsis on lines of ``width`` at most, cut between ``[ ... ]`` groups."""
    parts = re.findall(r"\[ [^]]* \]|\S+", text)
    lines = [""]
    for part in parts:
        if lines[-1].strip() and len(lines[-1]) + 1 + len(part) > width:
            lines.append("   ")
        lines[-1] += (" " if lines[-1].strip() else "") + part
    return lines


def main(program: Program, argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``program`` with ``argv`` (default: ``sys.argv[1:]``) and exit."""
    log = Log(program.name)
    args = list(sys.argv[1:] if argv is None else argv)
    run_main(log, lambda: start(program, args, log))


def parse(program: Program, argv: Sequence[str]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(every option and operand of ``program`` with its value, prog...).

    Raises ``UsageError`` (100), or ``ShowText`` for --help and --version.
    """
    texts = {
        options.HELP: program.help,
        options.VERSION: lambda: f"{program.name} (s6tls) {__version__}\n",
    }
    command = options.build_command(program.name, program.options, program.operands, texts)
    values, app = options.parse(command, argv, program.options, program.operands)
    if program.adjust is not None:
        program.adjust(values)
    return values, app


def start(program: Program, argv: Sequence[str], log: Log) -> int:
    """The shared steps of the module docstring; returns the exit code of ``serve``."""
    values, app = parse(program, argv)
    log.verbosity = values["verbosity"]
    settings = options.settings(values)
    restore_caller_environment(os.environ)
    tls = Options(**{k: v for k, v in values.items() if k in _TLS_FIELDS})
    cfg = TlsConfig.from_env(program.role, os.environ, tls, dtls=program.dtls)
    ids = check_ids(_asked_ids(settings, cfg))
    check_app(app[0])
    if cfg.session_dir:  # written after the drop: checked as the ids it will be written as
        from .tls.sessions import check_directory

        with as_ids(ids):
            check_directory(cfg.session_dir)
    conf = None if cfg.role == "client" or program.issues_tickets else no_tickets_conf(os.environ)
    if conf:
        os.environ["OPENSSL_CONF"] = conf  # OpenSSL reads it once, as it starts below
    # The TLS modules are half the start-up: a usage error does not pay for them.
    # Everything a connection needs is imported here, before privileges are
    # dropped: the new user may not be able to read the installation.
    from .serve import tunnel  # noqa: F401
    from .tls.context import Contexts

    if cfg.options.ktls:
        from .ktls import path as ktls_path  # noqa: F401  (the engine's, once the handshake is done)
    if cfg.dtls:
        from .dtls import link as dtlslink  # noqa: F401  (the link of every association)

    announce(cfg, settings, log)
    contexts = Contexts(cfg, log.warn, tickets=program.issues_tickets)
    if conf:
        del os.environ["OPENSSL_CONF"]  # ours, not the application's
    setup = Setup(log, cfg, app, settings, os.environ, ids, contexts)
    return program.serve(setup)


def _asked_ids(s: Settings, cfg: TlsConfig) -> Ids:
    """-u/-g/-U where the program has them and they are given, else TLS_UID/TLS_GID."""
    if s.uid is None and s.gid is None and not s.env_ids and not s.groups:
        return ids_from_config(cfg)
    return ids_from_options(s.uid, s.gid, s.env_ids, os.environ, s.groups)


def announce(cfg: TlsConfig, settings: Settings, log: Log) -> None:
    """The start-up warnings about a configuration that works, but maybe not as meant.

    The configuration's own (``TlsConfig.warnings``) and the options' are
    printed here, once per start, with --ktls on a kernel that cannot take
    any connection's records; those about the files (an expired
    certificate, a key others can read) come from ``Contexts``, at start and
    at each reload.
    """
    for line in cfg.warnings:
        log.warn(line)
    if cfg.options.ktls:
        from .ktls.sockopts import kernel_refusal

        why = kernel_refusal()
        if why:
            log.warn(f"--ktls: {why}: every connection's records stay in userspace")
    if settings.ident:  # -r, of UCSPI_TCP
        log.warn("-r: s6tls does no IDENT look-up, TCPREMOTEINFO stays unset")


def check_app(name: str) -> None:
    """Refuse at start an application that could never be started.

    ``name`` is looked up in PATH unless it holds a slash, as the spawn
    will.  Raises ``AppNotFound`` (127) or ``AppNotExecutable`` (126).
    """
    if "/" in name:
        path: str | None = name if os.path.exists(name) else None
    else:
        path = shutil.which(name) or shutil.which(name, mode=os.F_OK)
    if path is None:
        raise AppNotFound(f"unable to exec {name}: No such file or directory")
    if os.path.isdir(path):
        raise AppNotExecutable(f"unable to exec {name}: Is a directory")
    if not os.access(path, os.X_OK):
        raise AppNotExecutable(f"unable to exec {name}: Permission denied")


def restore_caller_environment(environ: "os._Environ[str]") -> None:
    """Take back what Python added to its own environment: a coerced ``LC_CTYPE``.

    Python sets ``LC_CTYPE=C.UTF-8`` when the caller's locale is C (PEP 538);
    the caller's own value, or its absence, is in ``/proc/self/environ``,
    which holds the environment the process was started with.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            started_with = f.read().split(b"\0")
    except OSError:
        return
    original = next((e[9:] for e in started_with if e.startswith(b"LC_CTYPE=")), None)
    if original is None:
        environ.pop("LC_CTYPE", None)
    else:
        environ["LC_CTYPE"] = os.fsdecode(original)

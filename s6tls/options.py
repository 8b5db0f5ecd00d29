"""Every command-line option of every s6tls program, in one table.

An option is one ``Opt``: its names (the short letter first, then skarnet's
long names), the variable it sets, what it stores there, and the line of
``--help`` that explains it.  A program is a tuple of ``Opt``; adding an
option to a program is adding one entry to its tuple (and, when it is a TLS
setting, one field to ``config.Options``).

Parsing goes through click, used as a tokeniser only: every value arrives
as text and is checked here, and what click itself rejects (an unknown
option, a missing operand) is reworded here, so every message is ours, in
s6-networking's words.  ``--help`` and ``--version`` print our own text.
"""

import dataclasses
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from .errors import UsageError

NOTSET: Any = object()  # a dest whose default comes from another Opt


@dataclass(frozen=True)
class Opt:
    """One option: ``names`` set ``dest`` to ``value``, or to the parsed argument.

    A *switch* has ``arg`` None and stores ``value``; several switches may
    share a dest (``-S`` True, ``-s`` False): the last one given wins.  An
    option with an ``arg`` (its metavar) stores ``parse(text, name)``.
    ``default`` is the dest's value when no option of that dest is given;
    exactly one Opt of each dest declares it.
    """

    dest: str
    names: tuple[str, ...]
    help: str
    value: Any = True
    arg: str | None = None
    parse: Callable[[str, str], Any] | None = None
    default: Any = NOTSET

    @property
    def name(self) -> str:
        """The name that stands for the option in messages and synopses."""
        return self.names[0]

    def with_default(self, default: Any) -> "Opt":
        """The same option with another default (one program's own)."""
        return dataclasses.replace(self, default=default)


@dataclass(frozen=True)
class Operand:
    """A positional argument before ``prog...``: ``ip``, ``port``, ``host``."""

    name: str
    parse: Callable[[str, str], Any] = lambda text, _name: text


# --- value checks: text in, value out, UsageError (100) naming the option -----


def unsigned(text: str, name: str) -> int:
    """A decimal integer >= 0."""
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{name} must be an unsigned integer, not {text!r}")
    return int(text)


def positive(text: str, name: str) -> int:
    """A decimal integer >= 1."""
    value = unsigned(text, name)
    if value < 1:
        raise UsageError(f"{name} must be at least 1")
    return value


def seconds(text: str, name: str) -> float:
    """A number of seconds > 0, fractions allowed."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError(f"{name} must be a positive number of seconds, not {text!r}")
    return value


def seconds_or_never(text: str, name: str) -> float | None:
    """A number of seconds > 0, or 0 for none (None)."""
    if text.isascii() and text.replace(".", "", 1).isdigit() and float(text) == 0:
        return None
    return seconds(text, name)


def port_number(text: str, name: str) -> int:
    """A TCP port, 0 to 65535."""
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise UsageError(f"{name} must be a port number from 0 to 65535, not {text!r}")
    return int(text)


def verbatim(text: str, _name: str) -> str:
    """The text as given (checked later, with the configuration)."""
    return text


def gid_list(text: str, name: str) -> tuple[int, ...]:
    """Comma-separated numeric group ids (an empty list for "")."""
    parts = text.split(",") if text else []
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise UsageError(f"{name} must be a comma-separated list of gids, not {text!r}")
    return tuple(int(p) for p in parts)


def nonempty(text: str, name: str) -> str:
    if not text:
        raise UsageError(f"{name} needs a value")
    return text


# --- the table ---------------------------------------------------------------


def switches(dest: str, default: Any, *entries: tuple[tuple[str, ...], Any, str]) -> tuple:
    """Switches sharing ``dest``; the one storing ``default`` declares it."""
    return tuple(
        Opt(dest, names, text, value=value, default=default if value == default else NOTSET)
        for names, value, text in entries
    )


CLOSE = (
    *switches(
        "close_notify",
        False,
        (("-S", "--close-notify"), True, "on EOF from prog, send close_notify first"),
        (("-s", "--no-close-notify"), False, "on EOF from prog, only half-close"),
    ),
    *switches(
        "strict_close_notify",
        False,
        (("-J", "--enforce-close-notify"), True, "peer EOF without close_notify: error, exit 98"),
        (("-j", "--no-enforce-close-notify"), False, "peer EOF without close_notify is an EOF"),
    ),
)
KEEP = switches(
    "keep_env",
    False,
    (("-Z", "--keep"), True, "keep CERTFILE, KEYFILE, CAFILE... for prog"),
    (("-z", "--no-keep"), False, "remove them from prog's environment"),
)
HANDSHAKE_TIMEOUT = Opt(
    "handshake_timeout_ms",
    ("-K", "--handshake-timeout"),
    "handshake time limit, else exit 98 (0: none)",
    arg="MS",
    parse=unsigned,
    default=0,
)
IDLE_TIMEOUT = Opt(
    "idle_timeout",
    ("--idle-timeout",),
    "close after SECONDS without application data",
    arg="SECONDS",
    parse=seconds,
    default=None,
)
KTLS = switches(
    "ktls",
    False,
    (("--ktls",), True, "after the handshake, let the kernel run the records (kernel TLS)"),
    (("--no-ktls",), False, "keep the records in userspace"),
)
TLS = (*CLOSE, *KEEP, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, *KTLS)
# UDP never says goodbye: the DTLS programs close an idle association by default.
DTLS_IDLE_TIMEOUT = dataclasses.replace(
    IDLE_TIMEOUT,
    help="close after SECONDS without application data (0: never)",
    parse=seconds_or_never,
    default=300,
)

VERBOSITY = Opt(
    "verbosity",
    ("-v", "--verbosity"),
    "0: fatal errors only, 1: warnings too, 2: a line per connection, 3: tracebacks",
    arg="VERBOSITY",
    parse=unsigned,
    default=1,
)
VERBOSITY_SWITCHES = switches(
    "verbosity",
    1,
    (("-q", "--quiet"), 0, "quiet: fatal errors only"),
    (("-Q", "--normally-verbose"), 1, "warnings and fatal errors"),
    (("-v", "--verbose"), 2, "verbose: also a line per connection"),
)

SERVER_TLS = (
    *switches(
        "peer_verify",
        "none",
        (("-Y", "--client-cert"), "optional", "ask for a client certificate"),
        (("-y", "--mandatory-client-cert"), "required", "require a client certificate"),
    ),
    Opt(
        "sni_level",
        ("-k", "--sni-level"),
        "CERTFILE:name keypairs: 0 no, 1 also, 2 only",
        arg="SNILEVEL",
        parse=unsigned,
        default=0,
    ),
    Opt("sni_level", ("--sni",), "the same as -k 1", value=1),
    Opt("sni_level", ("--mandatory-sni",), "the same as -k 2", value=2),
)
CLIENT_TLS = (
    *switches(
        "client_cert",
        False,
        (("-y", "--client-cert"), True, "present CERTFILE/KEYFILE as a client certificate"),
        (("-Y", "--no-client-cert"), False, "present no client certificate"),
    ),
    Opt(
        "servername",
        ("-k", "--servername"),
        "send SERVERNAME as SNI and check the server's certificate against it",
        arg="SERVERNAME",
        parse=verbatim,
        default=None,
    ),
    *switches(
        "verify_cert",
        True,
        (("--verify-cert",), True, "verify the server's certificate chain"),
        (("--no-verify-cert",), False, "do not verify the server's certificate at all"),
    ),
)

# What s6-tcpserver-access (s6-tlsserver) and s6-tcpclient (s6-tlsclient) share.
UCSPI_TCP = (
    *switches(
        "nodelay",
        False,
        (("-d", "--nagle"), False, "leave Nagle's algorithm on"),
        (("-D", "--no-nagle"), True, "set TCP_NODELAY"),
    ),
    *switches(
        "dns",
        True,
        (("--dns",), True, "look up TCPLOCALHOST and TCPREMOTEHOST"),
        (("-H", "--no-dns"), False, "look up no name"),
    ),
    *switches(
        "hosts",
        False,
        (("--no-hosts",), False, "accepted: the system resolver decides"),
        (("-h", "--hosts"), True, "accepted: the system resolver decides"),
    ),
    *switches(
        "ident",
        False,
        (("-R", "--no-ident"), False, "no IDENT look-up"),
        (("-r", "--ident"), True, "accepted: no IDENT look-up is done"),
    ),
    Opt(
        "localname",
        ("-l", "--local-name"),
        "TCPLOCALHOST is LOCALNAME, not looked up",
        arg="LOCALNAME",
        parse=nonempty,
        default=None,
    ),
)

HELP = "--help"
VERSION = "--version"


# --- parsing -------------------------------------------------------------------


class BadUsage(UsageError):
    """The command line lacks an operand or prog: the message is the synopsis."""


class ShowText(Exception):
    """--help or --version was given: print ``text`` on stdout and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def defaults(opts: Iterable[Opt]) -> dict[str, Any]:
    """The value of every dest when no option sets it."""
    out: dict[str, Any] = {}
    for opt in opts:
        if opt.default is not NOTSET:
            out[opt.dest] = opt.default
    return out


def build_command(
    name: str,
    opts: Sequence[Opt],
    operands: Sequence[Operand],
    texts: Mapping[str, Callable[[], str]],
) -> click.Command:
    """The click command that tokenises a program's arguments.

    ``texts`` makes what ``--help`` and ``--version`` print, only when they
    are given (the help takes a while to build).  Parsing stops
    at the first operand, as in skarnet's programs: what follows is prog's.
    """
    params: list[click.Parameter] = []
    for index, opt in enumerate(opts):
        # Options sharing a dest share a click parameter, so that click keeps
        # the last one given; a switch stores a marker that argv cannot hold
        # (a NUL), which parse() turns into the switch's value.
        decls = [*opt.names, opt.dest]
        if opt.arg is None:
            params.append(click.Option(decls, flag_value=f"\0{index}", default=None))
        else:
            params.append(click.Option(decls, type=str, default=None, metavar=opt.arg))
    for flag in (HELP, VERSION):
        params.append(
            click.Option(
                [flag],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_show(texts[flag]),
            )
        )
    params += [click.Argument([f"a{i}"]) for i in range(len(operands))]
    params.append(click.Argument(["prog"], nargs=-1, required=True))
    return click.Command(
        name,
        params=params,
        add_help_option=False,
        context_settings={"allow_interspersed_args": False, "help_option_names": []},
    )


def _our_words(
    exc: click.ClickException, name: str, opts: Sequence[Opt], operands: Sequence[Operand]
) -> UsageError:
    """What click rejected, as skalibs would say it; never click's wording."""
    if isinstance(exc, click.NoSuchOption):
        return UsageError(f"unrecognized option: {exc.option_name} (see {name} --help)")
    if isinstance(exc, click.BadOptionUsage):
        switch = any(exc.option_name in opt.names for opt in opts if opt.arg is None)
        return UsageError(
            f"option {exc.option_name} "
            + ("takes no argument" if switch else "requires an argument")
            + f" (see {name} --help)"
        )
    return BadUsage(f"{name} {synopsis(opts, operands)}")


def _show(text: Callable[[], str]) -> Callable[[click.Context, click.Parameter, bool], None]:
    def callback(_ctx: click.Context, _param: click.Parameter, given: bool) -> None:
        if given:
            raise ShowText(text())

    return callback


def parse(
    command: click.Command,
    argv: Sequence[str],
    opts: Sequence[Opt],
    operands: Sequence[Operand],
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(every dest and operand with its value, prog...) from ``argv``.

    Options given several times, or several switches of one dest: the last
    one wins, as with skarnet's ``gol``.  Raises ``UsageError`` for a bad
    value, ``ShowText`` for --help/--version, and click's own exceptions for
    what click rejects (unknown option, missing argument), which ``cli``
    turns into our one line.
    """
    try:
        ctx = command.make_context(command.name, list(argv))
    except click.ClickException as exc:
        raise _our_words(exc, command.name or "", opts, operands) from None
    takes_arg = {opt.dest: opt for opt in opts if opt.arg is not None}
    values = defaults(opts)
    for dest in dict.fromkeys(opt.dest for opt in opts):
        raw = ctx.params.get(dest)
        if raw is None:
            continue
        if raw.startswith("\0"):
            values[dest] = opts[int(raw[1:])].value
        else:
            opt = takes_arg[dest]
            assert opt.parse is not None
            values[dest] = opt.parse(raw, opt.name)
    for i, operand in enumerate(operands):
        values[operand.name] = operand.parse(ctx.params[f"a{i}"], operand.name)
    return values, tuple(ctx.params["prog"])


# --- help ----------------------------------------------------------------------


def synopsis(opts: Sequence[Opt], operands: Sequence[Operand]) -> str:
    """``[ -S | -s ] [ -K ms ] ... ip port prog...``: the options grouped by dest."""
    groups: dict[str, list[str]] = {}
    for opt in opts:
        shown = opt.name if opt.arg is None else f"{opt.name} {opt.arg.lower()}"
        groups.setdefault(opt.dest, []).append(shown)
    parts = [f"[ {' | '.join(items)} ]" for items in groups.values()]
    return " ".join([*parts, *(o.name for o in operands), "prog..."])


def option_lines(opts: Sequence[Opt], width: int = 30) -> list[str]:
    """The lines of --help about ``opts``: names, then what each does, within 79 columns.

    The argument is shown once, after the last name (``-K, --handshake-timeout=MS``);
    a number the option takes by default is shown after its text.
    """
    rows = []
    for opt in opts:
        names = ", ".join(opt.names)
        if opt.arg is None:
            note = " (default)" if opt.default is not NOTSET and opt.default == opt.value else ""
        else:
            names += f"={opt.arg}" if opt.names[-1].startswith("--") else f" {opt.arg}"
            shown = isinstance(opt.default, int | float) and not isinstance(opt.default, bool)
            note = f" (default {opt.default})" if shown else ""
        rows.append((names, opt.help + note))
    rows.append((HELP, "print this help and exit"))
    rows.append((VERSION, "print the version and exit"))
    return columns(rows, width)


def columns(rows: Iterable[tuple[str, str]], width: int = 30) -> list[str]:
    """``(name, text)`` rows as help lines within 79 columns, the texts from ``width`` on."""
    lines = []
    indent = " " * width
    for names, text in rows:
        head = f"  {names}"
        if len(head) >= width - 1:
            lines.append(head)
            head = ""
        lines += textwrap.wrap(text, 79, initial_indent=head.ljust(width), subsequent_indent=indent)
    return lines

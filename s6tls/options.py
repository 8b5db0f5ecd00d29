"""Every command-line option of every s6tls program, in one place.

An option is one ``Opt``: its names (the short letter first, then skarnet's
long names), the variable it sets, what it stores there, and the line of
``--help`` that explains it.  The tables below are the options, grouped as
the programs share them; a program is a tuple of them (its ``Program``, in
its own module).  Adding an option to a program is adding one entry to its
tuple, and one field to ``tls.config.Options`` when it is a TLS setting or to
``Settings`` when it is not.  The rows of --help about the environment are
here too.

Parsing goes through click, used as a tokeniser only: every value arrives
as text and is checked here, and what click itself rejects (an unknown
option, a missing operand) is reworded here, so every message is ours, in
s6-networking's words.  ``--help`` and ``--version`` print our own text.
"""

import dataclasses
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from .errors import UsageError
from .net.names import is_ip
from .numbers import decimal, gid_list

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


# skalibs' unsigned int: the largest number s6-networking's programs take (100 above it).
UINT_MAX = 2**32 - 1


def unsigned(text: str, name: str) -> int:
    """A decimal integer from 0 to ``UINT_MAX``."""
    value = decimal(text)
    if value is None:
        raise UsageError(f"{name} must be an unsigned integer, not {text!r}")
    if value > UINT_MAX:
        raise UsageError(f"{name} must be at most {UINT_MAX}, not {text}")
    return value


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
    value = decimal(text)
    if value is None or value > 65535:
        raise UsageError(f"{name} must be a port number from 0 to 65535, not {text!r}")
    return value


def verbatim(text: str, _name: str) -> str:
    """The text as given (checked later, with the configuration)."""
    return text


def nonempty(text: str, name: str) -> str:
    if not text:
        raise UsageError(f"{name} needs a value")
    return text


def ip_literal(text: str, name: str) -> str:
    """The ``ip`` operand of a server: an IPv4 or IPv6 literal."""
    if not is_ip(text):
        raise UsageError(f"{text} is not an IP address")
    return text


def local_ip(text: str, name: str) -> str:
    """-i: an IP literal."""
    if not is_ip(text):
        raise UsageError(f"{name} needs an IP address, not {text!r}")
    return text


def parse_timeouts(text: str, name: str = "-T") -> tuple[float, float]:
    """``x+y`` or ``x`` (seconds, integers) as s6-tcpclient's -T takes them."""
    first, plus, second = text.partition("+")
    x, y = decimal(first), decimal(second) if plus else 0
    if x is None or y is None:
        raise UsageError(f"{name} must be of the form x+y (seconds)")
    if max(x, y) > UINT_MAX:
        raise UsageError(f"{name}: x and y must be at most {UINT_MAX}")
    return float(x), float(y)


BANNER_MAX = 4096  # far below a socket's send buffer: writing it never blocks


def banner(text: str, name: str) -> bytes:
    """-B: the banner's bytes, at most ``BANNER_MAX``."""
    data = os.fsencode(text)
    if len(data) > BANNER_MAX:
        raise UsageError(f"{name}: the banner is longer than {BANNER_MAX} bytes")
    return data


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

# -4 and -6: the family of a server's ip, or of the addresses a client tries.
FAMILY = (
    Opt("family", ("-4", "--ipv4"), "IPv4 only", value=4, default=None),
    Opt("family", ("-6", "--ipv6"), "IPv6 only; a server on :: then takes no IPv4", value=6),
)

# The servers' own: readiness, limits, backlog, ids (s6-tcpserver's).
NOTIFY = Opt(
    "notify",
    ("-1", "--notify"),
    "once listening, write the port and a newline",
    default=False,
)
LIMITS = (
    Opt(
        "maxconn",
        ("-c", "--global-max-connections"),
        "at most MAXCONN connections at once",
        arg="MAXCONN",
        parse=positive,
        default=40,
    ),
    Opt(
        "localmaxconn",
        ("-C", "--local-max-connections"),
        "at most LOCALMAXCONN per client address",
        arg="LOCALMAXCONN",
        parse=positive,
        default=40,
    ),
)
BACKLOG = Opt(
    "backlog",
    ("-b", "--backlog"),
    "the listen backlog",
    arg="BACKLOG",
    parse=positive,
    default=128,
)
WORKERS = Opt(
    "workers",
    ("--workers",),
    "serve with N worker processes (default: one per CPU)",
    arg="N",
    parse=positive,
    default=None,
)
IDS = (
    Opt(
        "uid",
        ("-u", "--uid"),
        "serve each connection as UID (needs -g)",
        arg="UID",
        parse=unsigned,
        default=None,
    ),
    Opt(
        "gid",
        ("-g", "--gid"),
        "serve each connection as GID, no other group",
        arg="GID",
        parse=unsigned,
        default=None,
    ),
    Opt(
        "env_ids",
        ("-U", "--envuidgid"),
        "the ids of UID, GID, GIDLIST (s6-envuidgid)",
        default=False,
    ),
    Opt(
        "groups",
        ("-G", "--gidlist"),
        "with -g, the supplementary groups (comma-separated gids)",
        arg="GIDLIST",
        parse=gid_list,
        default=(),
    ),
)

# What s6-tlsserver does before TLS, as s6-tcpserver-access and proxy-server do.
GATE = (
    Opt("proxy", ("-L", "--proxy"), "read a PROXY protocol header (v1, v2) first", default=False),
    *switches(
        "strict",
        False,
        (("-W", "--no-strict-resolution"), False, "a failed name look-up is a warning"),
        (("-w", "--strict-resolution"), True, "a failed name look-up refuses the client"),
    ),
    *UCSPI_TCP,
    *switches(
        "paranoid",
        False,
        (("-P", "--no-paranoid"), False, "keep the client's name as found"),
        (("-p", "--paranoid"), True, "keep it only if it resolves back to the client"),
    ),
    Opt(
        "banner",
        ("-B", "--banner"),
        "write BANNER to the client first, before TLS",
        arg="BANNER",
        parse=banner,
        default=b"",
    ),
    Opt(
        "lookup_timeout_ms",
        ("-t", "--timeout"),
        "give the name look-ups MS milliseconds (0: the resolver's limits)",
        arg="MS",
        parse=unsigned,
        default=0,
    ),
    Opt(
        "rules_dir",
        ("-i", "--rules-directory"),
        "check each client against the rules in RULESDIR",
        arg="RULESDIR",
        parse=nonempty,
        default=None,
    ),
    Opt(
        "rules_file",
        ("-x", "--rules-file"),
        "check each client against the rules in the cdb RULESFILE",
        arg="RULESFILE",
        parse=nonempty,
        default=None,
    ),
)

# -i and -p, which s6-dtlsclient takes too.
LOCAL = (
    Opt(
        "local_ip",
        ("-i", "--local-ip"),
        "connect from LOCALIP",
        arg="LOCALIP",
        parse=local_ip,
        default=None,
    ),
    Opt(
        "local_port",
        ("-p", "--local-port"),
        "connect from LOCALPORT",
        arg="LOCALPORT",
        parse=port_number,
        default=0,
    ),
)
# s6-tcpclient's options, as s6-tlsclient takes them (with -4/-6 and -v).
DIAL = (
    *UCSPI_TCP,
    *switches(
        "qualify",
        False,
        (
            ("-N", "--no-qualify"),
            False,
            "accepted: resolv.conf says how host is qualified",
        ),
        (("-n", "--qualify"), True, "accepted: resolv.conf says how host is qualified"),
    ),
    Opt(
        "timeout_s",
        ("-t", "--timeout"),
        "give up after SECONDS, resolution and connection included (0: no limit)",
        arg="SECONDS",
        parse=unsigned,
        default=0,
    ),
    Opt(
        "timeouts",
        ("-T", "--connection-timeouts"),
        "try each address for X seconds, then the failed ones for Y",
        arg="X+Y",
        parse=parse_timeouts,
        default=(2.0, 58.0),
    ),
    *LOCAL,
)

# The clients' cleartext descriptors for prog.
APP_FDS = (
    Opt(
        "app_read",
        ("-6", "--read-fd"),
        "prog reads the cleartext on FD",
        arg="FD",
        parse=unsigned,
        default=6,
    ),
    Opt(
        "app_write",
        ("-7", "--write-fd"),
        "prog writes the cleartext on FD",
        arg="FD",
        parse=unsigned,
        default=7,
    ),
)
# -6 and -7 name the network's fds for s6-ucspitlsc (prog's too, before TLS), as in
# s6-networking.
NET_FDS = (
    dataclasses.replace(APP_FDS[0], help="read the network (before TLS, prog does) on FD"),
    dataclasses.replace(APP_FDS[1], help="write to the network (before TLS, prog does) on FD"),
)


def fds_from_6_7(values: dict[str, Any]) -> None:
    """-6 and -7 make ``app_fds`` (s6-tlsc and s6-ucspitlsc)."""
    values["app_fds"] = (values.pop("app_read"), values.pop("app_write"))


def servername_from_host(values: dict[str, Any]) -> None:
    """The server name defaults to host: a name, or an IP literal checked against IP SANs."""
    if values["servername"] is None:
        values["servername"] = values["host"]


# --- the environment, as --help lists it -----------------------------------------

SERVER_ENVIRONMENT = (
    ("CERTFILE, KEYFILE", "certificate chain and private key (PEM or DER)"),
    ("CERTFILE:name, KEYFILE:name", "a keypair per SNI name, with -k 1 or 2"),
    ("CAFILE, CADIR", "trust anchors for client certificates"),
    ("TLS_UID, TLS_GID", "ids to run as, once the keys are read"),
    ("TLS_*, PSKFILE, CRLFILE...", "TLS policy: versions, suites, ALPN, allow-lists (man page)"),
)
UCSPI_ENVIRONMENT = (("PROTO, TCPREMOTEIP...", "for prog; from the socket if PROTO is unset"),)
CLIENT_ENVIRONMENT = (
    ("CAFILE, CADIR", "trust anchors to verify the server (one is needed)"),
    ("CERTFILE, KEYFILE", "the client certificate and key, with -y"),
    ("TLS_UID, TLS_GID", "numeric ids to run as after reading the keys (root only)"),
    ("TLS_*, PSKFILE, CRLFILE...", "TLS policy: versions, suites, ALPN, allow-lists (man page)"),
)
DTLS_ENVIRONMENT = (
    ("DTLS_MTU", "the largest UDP payload, in bytes (default 1232)"),
    ("DTLS_HANDSHAKE_TIMEOUT_MIN, _MAX", "retransmission waits, ms (1000 doubling to 60000)"),
)
ENVID_ENVIRONMENT = (("UID, GID, GIDLIST", "with -U"),)
READINESS_ENVIRONMENT = (("NOTIFY_SOCKET", "systemd's readiness socket (Type=notify)"),)


# --- what is not TLS -------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a program's command line says beyond its TLS settings (``tls.config.Options``).

    One per program run, made from the parsed values by ``settings``: its
    operands, and the options of its network side.  A program's options set
    the fields they name; the other fields keep these defaults, which no
    program reads.
    """

    ip: str = ""  # a server's ip operand
    host: str = ""  # a client's host operand
    port: int = 0
    family: int | None = None  # -4 / -6
    # the servers'
    notify: bool = False  # -1
    maxconn: int = 0  # -c
    localmaxconn: int = 0  # -C
    backlog: int = 0  # -b
    workers: int | None = None  # --workers
    uid: int | None = None  # -u
    gid: int | None = None  # -g
    env_ids: bool = False  # -U
    groups: tuple[int, ...] = ()  # -G
    # before TLS (s6-tlsserver), and the names (s6-tlsclient too)
    proxy: bool = False  # -L
    strict: bool = False  # -w
    nodelay: bool = False  # -D
    dns: bool = False  # --dns / -H
    hosts: bool = False  # -h (accepted)
    ident: bool = False  # -r (accepted)
    paranoid: bool = False  # -p
    banner: bytes = b""  # -B
    lookup_timeout_ms: int = 0  # -t
    rules_dir: str | None = None  # -i
    rules_file: str | None = None  # -x
    localname: str | None = None  # -l
    # the connect (s6-tlsclient, s6-dtlsclient)
    qualify: bool = False  # -n (accepted)
    timeout_s: int = 0  # -t
    timeouts: tuple[float, float] = (0.0, 0.0)  # -T
    local_ip: str | None = None  # -i
    local_port: int = 0  # -p


SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))


def settings(values: Mapping[str, Any]) -> Settings:
    """The ``Settings`` in ``values`` (what ``parse`` returned): every field found there."""
    return Settings(**{k: v for k, v in values.items() if k in SETTINGS_FIELDS})


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

"""What every program shares: options, --help, --version, usage errors, start-up checks.

The option tests run the parser in-process (``program.parse``); the others
run the programs as processes, as a user does.
"""

import os
import re
import socket
import subprocess
from importlib import import_module
from pathlib import Path

import pytest
from conftest import ROOT, program
from ucspi_helpers import direct_pair, help_options, synopsis_options

from s6tls import program as shared
from s6tls.cli import Log, escape
from s6tls.deadline import after_ms, wait_ms
from s6tls.errors import UsageError

PROGRAMS = {
    "s6-tlsd": "s6tls.tlsd",
    "s6-tlsc": "s6tls.tlsc",
    "s6-tlsserver": "s6tls.tlsserver",
    "s6-tlsclient": "s6tls.tlsclient",
    "s6-ucspitlsd": "s6tls.ucspitlsd",
    "s6-ucspitlsc": "s6tls.ucspitlsc",
    "s6-dtlsserver": "s6tls.dtlsserver",
    "s6-dtlsclient": "s6tls.dtlsclient",
}
OPERANDS = {
    "s6-tlsserver": ["127.0.0.1", "0"],
    "s6-tlsclient": ["localhost", "443"],
    "s6-dtlsserver": ["127.0.0.1", "0"],
    "s6-dtlsclient": ["localhost", "5684"],
}

# skarnet's long names (the gol tables of s6-tlsd.c, s6-tlsc.c, s6-tlsserver.c and
# s6-tlsclient.c in s6-networking 2.8.0.1), each with the short form it stands for,
# and options given first, so that each pair changes something.
CLOSE = [
    ("--close-notify", "-S", ""),
    ("--no-close-notify", "-s", "-S"),
    ("--enforce-close-notify", "-J", ""),
    ("--no-enforce-close-notify", "-j", "-J"),
    ("--keep", "-Z", ""),
    ("--no-keep", "-z", "-Z"),
    ("--handshake-timeout=250", "-K 250", ""),
]
SERVER = [
    ("--client-cert", "-Y", ""),
    ("--mandatory-client-cert", "-y", ""),
    ("--sni-level=2", "-k 2", ""),
    ("--sni", "-k 1", ""),
    ("--mandatory-sni", "-k 2", ""),
]
CLIENT = [
    ("--client-cert", "-y", ""),
    ("--no-client-cert", "-Y", "-y"),
    ("--servername=example.org", "-k example.org", ""),
]
LOUDNESS = [
    ("--quiet", "-q", ""),
    ("--normally-verbose", "-Q", "-v"),
    ("--verbose", "-v", ""),
]
# s6-tcpserver-access's and s6-tcpclient's names (s6-tlsserver.c, s6-tlsclient.c).
UCSPI_TCP = [
    ("--no-nagle", "-D", ""),
    ("--nagle", "-d", "-D"),
    ("--no-dns", "-H", ""),
    ("--hosts", "-h", ""),
    ("--ident", "-r", ""),
    ("--no-ident", "-R", "-r"),
    ("--local-name=me.example", "-l me.example", ""),
]
ACCESS = [
    ("--proxy", "-L", ""),
    ("--strict-resolution", "-w", ""),
    ("--no-strict-resolution", "-W", "-w"),
    ("--paranoid", "-p", ""),
    ("--no-paranoid", "-P", "-p"),
    ("--banner=hello", "-B hello", ""),
    ("--timeout=700", "-t 700", ""),
    ("--rules-directory=/etc/rules", "-i /etc/rules", ""),
    ("--rules-file=/etc/rules.cdb", "-x /etc/rules.cdb", ""),
    ("--gidlist=10,20", "-G 10,20", ""),
]
TLSC = [
    *CLOSE,
    *CLIENT,
    ("--verbosity=0", "-v 0", ""),
    ("--read-fd=8", "-6 8", ""),
    ("--write-fd=9", "-7 9", ""),
]
LONG_OPTIONS = {
    "s6-tlsd": [*CLOSE, *SERVER, ("--verbosity=2", "-v 2", "")],
    "s6-tlsc": TLSC,
    "s6-ucspitlsd": [*CLOSE, *SERVER, ("--verbosity=2", "-v 2", "")],
    "s6-ucspitlsc": TLSC,
    "s6-tlsserver": [
        *LOUDNESS,
        *CLOSE,
        *SERVER,
        ("--notify", "-1", ""),
        ("--global-max-connections=5", "-c 5", ""),
        ("--local-max-connections=3", "-C 3", ""),
        ("--backlog=7", "-b 7", ""),
        ("--uid=65534", "-u 65534", ""),
        ("--gid=65534", "-g 65534", ""),
        ("--envuidgid", "-U", ""),
        *UCSPI_TCP,
        *ACCESS,
    ],
    "s6-tlsclient": [
        *LOUDNESS,
        *CLOSE,
        *CLIENT,
        ("--ipv4", "-4", ""),
        ("--ipv6", "-6", "-4"),
        ("--timeout=900", "-t 900", ""),
        ("--local-ip=::1", "-i ::1", ""),
        *UCSPI_TCP,
        ("--qualify", "-n", ""),
        ("--no-qualify", "-N", "-n"),
        ("--connection-timeouts=3+4", "-T 3+4", ""),
        ("--local-port=4000", "-p 4000", ""),
    ],
    "s6-dtlsserver": [
        *LOUDNESS,
        *CLOSE[4:],
        *SERVER,
        ("--notify", "-1", ""),
        ("--global-max-connections=5", "-c 5", ""),
        ("--local-max-connections=3", "-C 3", ""),
        ("--uid=65534", "-u 65534", ""),
        ("--gid=65534", "-g 65534", ""),
        ("--envuidgid", "-U", ""),
        ("--gidlist=10,20", "-G 10,20", ""),
    ],
    "s6-dtlsclient": [
        *LOUDNESS,
        *CLOSE[4:],
        *CLIENT,
        ("--ipv4", "-4", ""),
        ("--ipv6", "-6", "-4"),
        ("--local-ip=::1", "-i ::1", ""),
        ("--local-port=4000", "-p 4000", ""),
    ],
}


def parse(name: str, args: str) -> dict:
    prog = import_module(PROGRAMS[name]).PROGRAM
    values, app = shared.parse(prog, [*args.split(), *OPERANDS.get(name, []), "app"])
    assert app == ("app",)
    return values


@pytest.mark.parametrize(
    ("name", "long", "short", "before"),
    [(name, *row) for name, rows in LONG_OPTIONS.items() for row in rows],
)
def test_each_long_option_means_its_short_form(name, long, short, before):
    assert parse(name, f"{before} {long}") == parse(name, f"{before} {short}")
    assert parse(name, f"{before} {long}") != parse(name, before)  # it does something
    if "=" in long:  # skalibs' form, and the spelled-out one
        assert parse(name, f"{before} {long.replace('=', ' ')}") == parse(name, f"{before} {long}")


def test_the_verify_cert_pair_has_only_long_names():
    for name in ("s6-tlsc", "s6-tlsclient"):
        assert parse(name, "--no-verify-cert")["verify_cert"] is False
        assert parse(name, "--no-verify-cert --verify-cert")["verify_cert"] is True


def test_dns_and_no_hosts_have_only_long_names():
    for name in ("s6-tlsserver", "s6-tlsclient"):
        assert parse(name, "-H")["dns"] is False
        assert parse(name, "-H --dns")["dns"] is True
        assert parse(name, "-h --no-hosts")["hosts"] is False


def test_the_last_of_conflicting_options_wins_as_with_skalibs():
    assert parse("s6-tlsserver", "-q -v -q")["verbosity"] == 0
    assert parse("s6-tlsd", "--mandatory-sni -k 0")["sni_level"] == 0
    assert parse("s6-tlsd", "-k 0 --mandatory-sni")["sni_level"] == 2


def test_s6_tlsserver_waits_10_seconds_for_a_handshake_unless_told_otherwise():
    assert parse("s6-tlsserver", "")["handshake_timeout_ms"] == 10000
    assert parse("s6-tlsserver", "-K 0")["handshake_timeout_ms"] == 0
    assert parse("s6-tlsd", "")["handshake_timeout_ms"] == 0


def test_the_dtls_programs_bound_the_handshake_and_idle_associations_by_default():
    for name in ("s6-dtlsserver", "s6-dtlsclient"):
        values = parse(name, "")
        assert (values["handshake_timeout_ms"], values["idle_timeout"]) == (10000, 300)
        assert parse(name, "--idle-timeout 0")["idle_timeout"] is None
        assert parse(name, "--idle-timeout 2.5")["idle_timeout"] == 2.5
    assert parse("s6-tlsd", "")["idle_timeout"] is None  # the twin: TCP says goodbye


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("s6-tlsd", "-K soon", "-K must be an unsigned integer, not 'soon'"),
        ("s6-tlsd", "--handshake-timeout=-1", "-K must be an unsigned integer, not '-1'"),
        ("s6-tlsc", "-6 x", "-6 must be an unsigned integer, not 'x'"),
        ("s6-tlsserver", "-c 0", "-c must be at least 1"),
        ("s6-tlsd", "--idle-timeout=0", "--idle-timeout must be a positive number of seconds"),
        ("s6-tlsd", "--idle-timeout=nan", "--idle-timeout must be a positive number of seconds"),
        ("s6-dtlsserver", "--idle-timeout=-1", "--idle-timeout must be a positive number"),
        ("s6-dtlsserver", "-S", "unrecognized option: -S"),
        ("s6-tlsd", "-K 99999999999", "-K must be at most 4294967295, not 99999999999"),
        ("s6-tlsclient", "-T 4294967296+0", "-T: x and y must be at most 4294967295"),
    ],
)
def test_a_bad_value_names_the_option(name, args, message):
    with pytest.raises(UsageError) as raised:
        parse(name, args)
    assert str(raised.value).startswith(message)


def test_numbers_go_up_to_skalibs_unsigned_int_and_a_wait_that_long_fits_poll():
    """As skalibs' parser, 2^32 - 1 at most; a -K that long sleeps in several polls."""
    assert parse("s6-tlsd", "-K 4294967295")["handshake_timeout_ms"] == 4294967295
    assert wait_ms(after_ms(4294967295, 10.0), 10.0) == 2**31 - 1  # poll takes a C int
    assert wait_ms(10.5, 10.0) == 500


# --- as processes ---------------------------------------------------------------

CLICK_WORDING = re.compile(
    r"Error:|Usage:|Try '|No such option|Invalid value|Missing (argument|option)|Got unexpected"
    r"|is not a valid|does not take a value|requires an argument\.",
)


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize(
    ("args", "line"),
    [
        ([], "usage: {name} [ "),
        (["-X", "a", "b", "prog"], "fatal: unrecognized option: -X (see {name} --help)"),
        (["--nope", "a", "b", "prog"], "fatal: unrecognized option: --nope (see {name} --help)"),
        (["-K"], "fatal: option -K requires an argument (see {name} --help)"),
        (["--keep=yes", "a"], "fatal: option --keep takes no argument (see {name} --help)"),
        (["-K", "1e3", "a", "b", "prog"], "fatal: -K must be an unsigned integer, not '1e3'"),
    ],
)
def test_usage_errors_are_one_line_in_s6_style_exit_100(name, args, line, server_env):
    res = subprocess.run([*program(name), *args], env=server_env, capture_output=True, timeout=30)
    err = res.stderr.decode()
    assert res.returncode == 100, err
    assert err.count("\n") == 1 and err.startswith(f"{name}: " + line.format(name=name)), err
    assert not CLICK_WORDING.search(err), err
    assert res.stdout == b""


def test_a_port_that_is_not_a_number_is_named_as_such(server_env):
    for args in (["127.0.0.1", "https", "cat"], ["-v", "2", "127.0.0.1", "cat"]):
        res = subprocess.run(
            [*program("s6-tlsserver"), *args], env=server_env, capture_output=True, timeout=30
        )
        assert res.returncode == 100
        assert res.stderr.decode().count("\n") == 1
        assert not CLICK_WORDING.search(res.stderr.decode()), res.stderr
    assert res.stderr.decode() == "s6-tlsserver: fatal: 2 is not an IP address\n"


@pytest.mark.parametrize("name", [*PROGRAMS, "s6tls"])
def test_help_says_options_environment_and_exit_codes_in_two_screens(name):
    res = subprocess.run([*program(name), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"usage: {name} ")
    assert len(lines) <= 100 and max(map(len, lines)) <= 100
    assert "Exit codes" in res.stdout and "100" in res.stdout
    if name == "s6tls":
        return
    assert "111" in res.stdout and "127" in res.stdout
    read = res.stdout.split("Environment variables read:\n", 1)[1].split("\n\n", 1)[0]
    needed = (
        "CAFILE" if name in ("s6-tlsc", "s6-tlsclient", "s6-dtlsclient") else "CERTFILE, KEYFILE"
    )
    assert needed in read and "TLS_UID" in read
    options = res.stdout.split("Options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    for row, after in zip(options, [*options[1:], ""], strict=True):
        if row.startswith("  -"):  # its meaning beside it, or on the next line
            assert re.search(r"\S  +\S", row) or after.startswith(" " * 20), row
    assert "--help" in res.stdout and "--version" in res.stdout


@pytest.mark.parametrize("name", [*PROGRAMS, "s6tls"])
def test_version(name):
    res = subprocess.run([*program(name), "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert res.stdout in (f"{name} (s6tls) 0.1.0\n", "s6tls 0.1.0\n")


def test_s6tls_without_demo_is_a_usage_error_and_its_help_is_not():
    bad = subprocess.run([*program("s6tls"), "x"], capture_output=True, text=True, timeout=30)
    assert (bad.returncode, bad.stderr.split(":")[1]) == (100, " usage")
    good = subprocess.run([*program("s6tls"), "--help"], capture_output=True, timeout=30)
    assert good.returncode == 0


@pytest.mark.parametrize("name", PROGRAMS)
def test_man_page_synopsis_lists_exactly_the_options_of_help(name):
    page: Path = ROOT / "man" / f"{name}.1"
    assert synopsis_options(page) == help_options(program(name))


@pytest.mark.parametrize("name", PROGRAMS)
def test_man_page_names_every_long_option(name):
    text = (ROOT / "man" / f"{name}.1").read_text().replace("\\-", "-")
    res = subprocess.run([*program(name), "--help"], capture_output=True, text=True, timeout=30)
    longs = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", res.stdout))
    assert longs and {n for n in longs if n not in text} == set()


# --- start-up checks --------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAMS)
def test_an_application_that_cannot_run_is_refused_at_start(name, server_env, pki, tmp_path):
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    env = {**server_env, "CAFILE": pki["ca"]}
    for app, code, why in (
        ("/nonexistent/app", 127, "No such file or directory"),
        ("no-such-app-on-path", 127, "No such file or directory"),
        (str(plain), 126, "Permission denied"),
        (str(tmp_path), 126, "Is a directory"),
    ):
        res = subprocess.run(
            [*program(name), *OPERANDS.get(name, []), app],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        message = f"{name}: fatal: unable to exec {app}: {why}\n"
        assert (res.returncode, res.stderr) == (code, message)
    if name == "s6-tlsd":  # the twin: a program on PATH is accepted, and the TLS work begins
        with closed_connection() as conn:
            res = subprocess.run(
                [*program(name), "true"], env=env, capture_output=True, stdin=conn, timeout=30
            )
        assert res.returncode == 97, res.stderr


def closed_connection() -> socket.socket:
    """One end of a connection whose other end is closed: a handshake on it fails at once."""
    ours, theirs = socket.socketpair()
    theirs.close()
    return ours


@pytest.mark.parametrize(
    ("name", "args", "env", "message"),
    [
        ("s6-tlsd", [], {"TLS_UID": "65534"}, "TLS_UID needs TLS_GID: "),
        ("s6-tlsclient", ["localhost", "1"], {"TLS_UID": "65534"}, "TLS_UID needs TLS_GID: "),
        ("s6-tlsserver", ["-u", "65534", "127.0.0.1", "0"], {}, "-u needs -g: "),
        ("s6-tlsserver", ["-U", "127.0.0.1", "0"], {"UID": "1"}, "-U needs a numeric GID"),
    ],
)
def test_a_uid_without_a_gid_is_refused_at_start(name, args, env, message, server_env, pki):
    environ = {**server_env, "CAFILE": pki["ca"], **env}
    res = subprocess.run(
        [*program(name), *args, "true"], env=environ, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 100, res.stderr
    assert res.stderr.startswith(f"{name}: fatal: {message}") and res.stderr.count("\n") == 1


def as_nobody(argv: list[str]) -> list[str]:
    """``argv`` as uid/gid 65534, able to read this checkout and the interpreter anyway."""
    caps = "+dac_read_search"
    return [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        *argv,
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_process_that_is_not_root_cannot_be_asked_to_change_ids(server_env):
    for argv, env, asked in (
        (["s6-tlsserver", "-u", "0", "-g", "0", "127.0.0.1", "0"], {}, "uid 0 gid 0 (-u, -g)"),
        (["s6-tlsd"], {"TLS_UID": "1", "TLS_GID": "1"}, "uid 1 gid 1 (TLS_UID, TLS_GID)"),
    ):
        res = subprocess.run(
            as_nobody([*program(argv[0]), *argv[1:], "true"]),
            env={**server_env, **env},
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 100, res.stderr
        assert res.stderr == (
            f"{argv[0]}: fatal: unable to become {asked}:"
            " setgid and setuid need root, and this process runs as uid 65534\n"
        )
    # asking for the ids it already has changes nothing, and is accepted: the TLS work
    # begins (and ends at once, the peer gone)
    with closed_connection() as conn:
        res = subprocess.run(
            as_nobody([*program("s6-tlsd"), "--", "true"]),
            env={**server_env, "TLS_UID": "65534", "TLS_GID": "65534"},
            capture_output=True,
            text=True,
            timeout=30,
            stdin=conn,
        )
    assert res.returncode == 97, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_s6_tlsserver_u_and_g_leave_no_supplementary_group(server_env, pki, reap):
    from server_helpers import start_server, tls_connect

    status = ["sh", "-c", 'grep -E "^(Uid|Gid|Groups):" /proc/self/status']
    server, port = start_server(["-u", "65534", "-g", "65534"], status, server_env)
    reap.append(server)
    with tls_connect(port, pki["ca"]) as conn:
        seen = b""
        while chunk := conn.recv(1000):
            seen += chunk
    uid, gid, groups = seen.decode().splitlines()
    assert uid.split()[1:] == ["65534"] * 4 and gid.split()[1:] == ["65534"] * 4
    assert groups.split() == ["Groups:"]  # root's groups are gone, and no other was added
    server.terminate()
    server.communicate(timeout=30)


# --- the application's environment and the log ---------------------------------------


@pytest.mark.parametrize("lc_ctype", [None, "C"])
def test_the_application_sees_the_callers_locale_not_pythons(lc_ctype, server_env, client_env):
    server = {k: v for k, v in server_env.items() if not k.startswith(("LC_", "LANG"))}
    client = {k: v for k, v in client_env.items() if not k.startswith(("LC_", "LANG"))}
    if lc_ctype is not None:
        server["LC_CTYPE"] = client["LC_CTYPE"] = lc_ctype
    # shell applications: a Python one would coerce its own locale
    server_app = ["sh", "-c", 'echo "server ${LC_CTYPE-unset}"']
    client_app = ["sh", "-c", 'exec 7>&-; cat <&6; echo "client ${LC_CTYPE-unset}"']
    (scode, _, serr), (ccode, out, cerr) = direct_pair(
        ([], server_app, server), (["-k", "localhost"], client_app, client)
    )
    assert (scode, ccode) == (0, 0), (serr, cerr)
    seen = lc_ctype or "unset"  # where Python, left alone, would pass on C.UTF-8
    assert out.decode() == f"server {seen}\nclient {seen}\n"


def test_escape_writes_every_byte_outside_printable_ascii_as_hex():
    assert escape("plain text: ~!") == "plain text: ~!"
    assert escape("a\nb\x1b[31mc\x7f\x00") == "a\\x0Ab\\x1B[31mc\\x7F\\x00"
    assert escape("straße") == "stra\\xC3\\x9Fe"
    assert escape(b"\xff\xfe".decode("utf-8", "surrogateescape")) == "\\xFF\\xFE"


def test_escape_tells_an_escape_from_text_that_looks_like_one():
    """A backslash is escaped too: a peer cannot write what reads as an escaped byte."""
    assert escape("a\\b") == "a\\x5Cb"
    assert escape("x\\x0Ay") != escape("x\ny")


def test_every_log_line_is_one_line_whatever_it_holds(capsys):
    log = Log("s6-tlsd", verbosity=2).about("[::1]:4000", 77)
    log.info("sni x\ns6-tlsd: info: forged\x1b[2J")
    log.warn("\r\x07")
    err = capsys.readouterr().err
    assert err == (
        "s6-tlsd: info: peer [::1]:4000 pid 77: sni x\\x0As6-tlsd: info: forged\\x1B[2J\n"
        "s6-tlsd: warning: peer [::1]:4000 pid 77: \\x0D\\x07\n"
    )


def test_even_a_traceback_at_v_3_is_escaped(capsys):
    log = Log("s6-tlsd", verbosity=3)
    try:
        raise ValueError("peer said \x1b[2J\nforged")
    except ValueError:
        log.traceback()
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.rstrip("\n").endswith("ValueError: peer said \\x1B[2J\\x0Aforged")


def test_a_server_name_with_control_characters_cannot_forge_a_log_line(server_env, pki):
    """A raw client sends a server name holding a newline and an escape sequence."""
    from OpenSSL import SSL
    from ucspi_helpers import finish, spawn_tlsd, tcp_pair

    s, c = tcp_pair()
    tlsd = spawn_tlsd(["-v", "2"], ["true"], server_env, s)
    ctx = SSL.Context(SSL.TLS_METHOD)
    conn = SSL.Connection(ctx, c)
    conn.set_tlsext_host_name(b"x\ns6-tlsd: warning: forged line\x1b[31m")
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.shutdown()
    except SSL.Error:
        pass  # a server that refuses such a name is fine too: what matters is the log
    c.close()
    _code, _out, err = finish(tlsd)
    lines = err.splitlines()
    assert len(lines) == 1, lines  # one event, one line
    assert lines[0].startswith("s6-tlsd: ")
    assert not re.search(r"[^\x20-\x7e]", lines[0]), lines[0]

"""Every long option means what its short form means, on every program (table-driven).

The table is the programs' own option tables: for each option that has a
short name and long names, the same command line with either name must
parse to the same values.  The sample arguments cover every metavar.
"""

import importlib

import pytest

from s6tls.options import BadUsage
from s6tls.program import parse

MODULES = ["tlsd", "tlsc", "tlsserver", "tlsclient", "ucspitlsd", "ucspitlsc"]
SAMPLES = {
    "BACKLOG": "64",
    "BANNER": "220 ready",
    "FD": "9",
    "GID": "1000",
    "GIDLIST": "10,20",
    "LOCALIP": "127.0.0.1",
    "LOCALMAXCONN": "3",
    "LOCALNAME": "me.example",
    "LOCALPORT": "4000",
    "MAXCONN": "5",
    "MS": "1234",
    "RULESDIR": "/etc/rules",
    "RULESFILE": "/etc/rules.cdb",
    "SECONDS": "7",
    "SERVERNAME": "other.example",
    "SNILEVEL": "2",
    "UID": "1000",
    "VERBOSITY": "2",
    "X+Y": "3+4",
}
OPERANDS = {"ip": "127.0.0.1", "port": "443", "host": "example.org"}


def cases():
    for name in MODULES:
        program = importlib.import_module(f"s6tls.{name}").PROGRAM
        for opt in program.options:
            short = [n for n in opt.names if not n.startswith("--")]
            for long in (n for n in opt.names if n.startswith("--")):
                if short:
                    yield pytest.param(program, opt, short[0], long, id=f"{program.name} {long}")


@pytest.mark.parametrize(("program", "opt", "short", "long"), list(cases()))
def test_a_long_option_is_its_short_form(program, opt, short, long):
    tail = [OPERANDS[o.name] for o in program.operands] + ["prog"]
    if opt.arg is None:
        by_short, by_long = [short], [long]
    else:
        value = SAMPLES[opt.arg]
        by_short, by_long = [short, value], [f"{long}={value}"]
    values, app = parse(program, [*by_short, *tail])
    assert parse(program, [*by_long, *tail]) == (values, app)
    # and the option does something: a switch stores its value, an argument
    # changes the values from the defaults
    if opt.arg is None:
        assert values.get(opt.dest, opt.value) == opt.value
    else:
        assert values != parse(program, tail)[0]


def test_every_metavar_has_a_sample():
    for name in MODULES:
        for opt in importlib.import_module(f"s6tls.{name}").PROGRAM.options:
            assert opt.arg is None or opt.arg in SAMPLES, opt


def test_an_unknown_long_option_is_refused_in_our_words():
    from s6tls.tlsd import PROGRAM

    with pytest.raises(Exception, match="unrecognized option: --no-such-option") as info:
        parse(PROGRAM, ["--no-such-option", "prog"])
    assert not isinstance(info.value, BadUsage)

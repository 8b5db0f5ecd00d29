"""What every program shares: the usage error, and a man page that matches --help."""

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, program
from ucspi_helpers import help_options, synopsis_options

PROGRAMS = ["s6-tlsd", "s6-tlsc", "s6-tlsserver", "s6-tlsclient"]


@pytest.mark.parametrize("name", PROGRAMS)
def test_missing_arguments_are_a_usage_error(name, server_env):
    res = subprocess.run(program(name), env=server_env, capture_output=True, timeout=30)
    assert res.returncode == 100
    assert res.stderr.decode().startswith(f"{name}: usage: {name} [ ")
    assert res.stderr.decode().count("\n") == 1


@pytest.mark.parametrize("name", PROGRAMS)
def test_man_page_synopsis_lists_exactly_the_options_of_help(name):
    page: Path = ROOT / "man" / f"{name}.1"
    assert synopsis_options(page) == help_options(program(name))

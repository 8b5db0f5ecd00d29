"""s6-tlsclient's s6-tcpclient options, as real processes against s6-tlsserver."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import program
from server_helpers import full_listener, start_server
from ucspi_helpers import fatal

SERVER_PRINT_ENV = [sys.executable, "-c", "import os,sys; sys.stdout.write(repr(dict(os.environ)))"]
CLIENT_PRINT_ENV = [
    sys.executable,
    "-c",
    "import os; os.close(7); reply = b''\n"
    "while chunk := os.read(6, 1 << 20): reply += chunk\n"
    "print(repr((dict(os.environ), eval(reply))))",
]


@pytest.fixture
def server_port(server_env, reap):
    proc, port = start_server(["-H"], SERVER_PRINT_ENV, server_env)
    reap.append(proc)
    return port


def client(args, port, pki, host="127.0.0.1", timeout=60):
    return subprocess.run(
        [*program("s6-tlsclient"), *args, "-k", "localhost", host, str(port), *CLIENT_PRINT_ENV],
        env={**os.environ, "CAFILE": pki["ca"]},
        capture_output=True,
        timeout=timeout,
    )


def test_both_names_by_default(server_port, pki):
    res = client([], server_port, pki)
    assert res.returncode == 0, res.stderr
    ours, _theirs = eval(res.stdout)
    assert ours["TCPLOCALHOST"] == "localhost"
    assert ours["TCPREMOTEHOST"] == "localhost"


def test_no_dns_and_a_local_name(server_port, pki):
    res = client(["-H", "-l", "me.example"], server_port, pki)
    assert res.returncode == 0, res.stderr
    ours, _theirs = eval(res.stdout)
    assert ours["TCPLOCALHOST"] == "me.example"
    assert "TCPREMOTEHOST" not in ours


def test_local_address_and_port(server_port, pki):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    res = client(["-H", "-D", "-i", "127.0.0.1", "-p", str(free)], server_port, pki)
    assert res.returncode == 0, res.stderr
    ours, theirs = eval(res.stdout)
    assert ours["TCPLOCALPORT"] == theirs["TCPREMOTEPORT"] == str(free)


@pytest.mark.parametrize("args", [["-n"], ["-N"], ["-h"], ["--no-hosts"], ["-R"], ["--dns"]])
def test_compatibility_options_are_accepted(server_port, pki, args):
    res = client(args, server_port, pki)
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""


def test_ident_is_accepted_with_a_warning(server_port, pki):
    res = client(["-r"], server_port, pki)
    assert res.returncode == 0
    assert res.stderr.decode() == (
        "s6-tlsclient: warning: -r: s6tls does no IDENT look-up, TCPREMOTEINFO stays unset\n"
    )


@pytest.fixture
def full_port():
    with full_listener() as port:
        yield port


@pytest.mark.parametrize("args", [["-T", "1+0"], ["-T", "30+30", "-t", "1"]])
def test_connection_timeouts(full_port, pki, args):
    start = time.monotonic()
    res = client(["-H", *args], full_port, pki)
    assert 0.8 < time.monotonic() - start < 20
    assert res.returncode == 111
    reason = fatal(res.stderr.decode(), "s6-tlsclient")
    assert reason == f"unable to connect to 127.0.0.1 port {full_port}: connection timed out"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["-T", "1.5"], "-T must be of the form x+y"),
        (["-i", "localhost"], "-i needs an IP address"),
        (["-p", "70000"], "-p must be a port number"),
        (["-t", "-1"], "-t must be an unsigned integer"),
    ],
)
def test_bad_values_are_usage_errors(pki, args, why):
    res = client(args, 1, pki)
    assert res.returncode == 100
    assert fatal(res.stderr.decode(), "s6-tlsclient").startswith(why)

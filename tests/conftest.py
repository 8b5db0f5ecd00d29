"""Shared fixtures: certificates from a throw-away CA, and how to run the programs."""

import contextlib
import faulthandler
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import guest
import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent


def program(name: str) -> list[str]:
    """The command that runs s6tls program ``name`` from this checkout's bin/.

    Always the checkout's code, with the test interpreter, whatever copy is
    installed; the installed entry points are the same ``main`` functions.
    """
    return [sys.executable, str(ROOT / "bin" / name)]


def pytest_configure(config: pytest.Config) -> None:
    guest.pytest_configure(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked slow unless S6TLS_SLOW=1 or they were selected with -m."""
    if os.environ.get("S6TLS_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow mode: set S6TLS_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# No test may hang the suite: past this many seconds (S6TLS_TEST_LIMIT), every
# thread's stack is printed and the test fails where it waits.
TEST_LIMIT = int(os.environ.get("S6TLS_TEST_LIMIT", "300"))


class Overran(Exception):
    """A test (with its fixtures) took more than TEST_LIMIT seconds."""


def _overran(_signum: int, _frame: object) -> None:
    faulthandler.dump_traceback(all_threads=True)
    raise Overran(f"the test took more than {TEST_LIMIT} s (S6TLS_TEST_LIMIT)")


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    """Bound each test, its fixtures included, by TEST_LIMIT seconds (SIGALRM)."""
    previous = signal.signal(signal.SIGALRM, _overran)
    signal.alarm(TEST_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic garbage collector disabled inside: only reference counts free objects."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    """Write a leaf's certificate and its key, the key with mode 0600 as keys should be."""
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def other_ca() -> trustme.CA:
    """A CA nobody trusts: its certificates must be rejected."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="session")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client.example", common_name="client.example")


@pytest.fixture(scope="session")
def pki(
    tmp_path_factory: pytest.TempPathFactory,
    ca: trustme.CA,
    other_ca: trustme.CA,
    server_cert: trustme.LeafCert,
    client_cert: trustme.LeafCert,
) -> dict[str, str]:
    """PEM files on disk: ca, other_ca, server cert/key, client cert/key."""
    d = tmp_path_factory.mktemp("pki")
    files = {
        "ca": ca.cert_pem,
        "other_ca": other_ca.cert_pem,
        "server_cert": server_cert.cert_chain_pems[0],
        "server_key": server_cert.private_key_pem,
        "client_cert": client_cert.cert_chain_pems[0],
        "client_key": client_cert.private_key_pem,
    }
    out = {}
    for name, blob in files.items():
        path = d / f"{name}.pem"
        blob.write_to_path(str(path))
        path.chmod(0o600)  # keys others can read earn a warning
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def rsa_keypair(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> tuple[str, str]:
    """(certificate, key) files of an RSA leaf for localhost, from ``ca``."""
    d = tmp_path_factory.mktemp("rsa")
    write_leaf(ca.issue_cert("localhost", key_type=trustme.KeyType.RSA), d / "c.pem", d / "k.pem")
    return str(d / "c.pem"), str(d / "k.pem")


@pytest.fixture
def server_env(pki: dict[str, str]) -> dict[str, str]:
    """The environment of a server: ours plus CERTFILE, KEYFILE and CAFILE."""
    return {
        **os.environ,
        "CERTFILE": pki["server_cert"],
        "KEYFILE": pki["server_key"],
        "CAFILE": pki["ca"],
    }


@pytest.fixture
def client_env(pki: dict[str, str]) -> dict[str, str]:
    """The environment of a client: ours plus CAFILE (and a client keypair for -y)."""
    return {
        **os.environ,
        "CAFILE": pki["ca"],
        "CERTFILE": pki["client_cert"],
        "KEYFILE": pki["client_key"],
    }


STARTED: list[subprocess.Popen] = []  # started by helpers; killed and reaped after each test


@pytest.fixture(autouse=True)
def _reap_started() -> Iterator[None]:
    """Whatever a test leaves running in STARTED (it failed half-way) is killed and reaped."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen]]:
    """Processes appended to this list are killed and reaped after the test."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


@pytest.fixture
def dtls_server(server_env: dict[str, str]) -> Iterator:
    """Start ``s6-dtlsserver -v -1 args host 0 prog`` (env: ``server_env``): (process, port).

    After the test, each server still running gets SIGQUIT, which ends its
    associations too (their children and progs, which a SIGKILL of the server
    alone would orphan), and is reaped; SIGKILL if it takes too long.
    """
    from server_helpers import start_server

    started: list[subprocess.Popen] = []

    def start(args, prog, env=None, host="127.0.0.1"):
        proc, port = start_server(["-v", *args], prog, env or server_env, host, "s6-dtlsserver")
        started.append(proc)
        return proc, port

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)


PSK_KEY = "00112233445566778899aabbccddeeff0011223344556677"  # alice's, in ``pskfile``


@pytest.fixture
def pskfile(tmp_path: Path) -> str:
    """A PSKFILE with two identities, bob and alice (``PSK_KEY``), mode 0600."""
    path = tmp_path / "psk"
    path.write_text(f"# who may talk to us\nbob:{'ab' * 32}\nalice:{PSK_KEY}\n")
    path.chmod(0o600)
    return str(path)
